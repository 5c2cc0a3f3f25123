"""Residual additions on integer kernels: a tensor quantized once where it is made, for every reader; the int8 file
runs the ResNet's additions as QLinearAdd in ONNX Runtime, like its own quantize_static, and computes what was
trained."""

from __future__ import annotations

import copy
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ort_optimized_kernels, qat_steps
from torch import Tensor, nn

from lightning_compress import QATConfig, export_onnx, prepare_qat
from lightning_compress.quantization import set_phase, unprepare
from lightning_compress.quantization.prepare import (
    all_quantizers,
    float_state_dict,
    folded_batchnorms,
    quantization_plan,
    quantized_layers,
    tensor_quantizers,
)
from lightning_compress.tasks import ResNet20


def trained_resnet(config: QATConfig | None = None, steps: int = 6) -> tuple[nn.Module, Tensor]:
    """A ResNet-20 of width 4 on 16×16 inputs after a few QAT steps, BatchNorm statistics then frozen (evaluation)."""
    torch.manual_seed(0)
    model = ResNet20((3, 16, 16), 10, width=4)
    layers = prepare_qat(model, config or QATConfig())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    model.train()
    for step in range(steps):
        if step == steps // 2:  # BatchNorm statistics frozen: the convs compute the folded layer, outputs quantized
            for bn in folded_batchnorms(layers):
                bn.eval()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x


def test_plan_of_a_resnet():
    model = ResNet20((3, 16, 16), 10, width=4)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    plan = quantization_plan(model, names, residuals=True)
    # each block's output (its final ReLU module) and the stem's ReLU: the tensors read by a conv and an addition
    assert set(plan.tensor_hosts) == {"features.2", *(f"features.{b}.relu" for b in range(3, 12))}
    # the first conv of every block reads that tensor (and so do the 1x1 shortcut convs of blocks 6 and 9)
    assert plan.shared_inputs["features.3.body.0"] == "features.2"
    assert plan.shared_inputs["features.4.body.0"] == "features.3.relu"
    assert plan.shared_inputs["features.6.shortcut.0"] == "features.5.relu"
    # conv -> BatchNorm -> ReLU -> conv: the next quantizer quantizes the output; the stem's ReLU is a host
    assert plan.plain_outputs == {"features.0", *(f"features.{b}.body.0" for b in range(3, 12))}
    assert not plan.float_additions and plan.traced
    assert plan.pairs["features.3.body.3"] == "features.3.body.4"


def test_resnet_int8_export_runs_additions_as_qlinearadd_and_matches(tmp_path):
    model, x = trained_resnet()
    assert set(tensor_quantizers(model)) == {"features.2", *(f"features.{b}.relu" for b in range(3, 12))}
    # a shared input quantizer is the host's own module: one range, observed once
    assert model.features[4].body[0].input_quantizer is model.features[3].relu.output_quantizer
    path = export_onnx(model, tmp_path / "resnet.onnx", x)
    kernels = ort_optimized_kernels(path, tmp_path)
    assert kernels.count("QLinearAdd") == 9 and kernels.count("QLinearConv") == 21 and kernels.count("QGemm") == 1
    assert kernels.count("QuantizeLinear") == 2  # the model's input, and the pooled features before the classifier
    assert not {"Conv", "FusedConv", "Add", "Relu", "Gemm"} & set(kernels)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x)
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    logit_step = float(model.fc.output_quantizer.qparams()[0])
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.98
    assert (out - ref).abs().max() <= 2.001 * logit_step  # rounding ties of integer requantization, at most 2 steps


def test_block_outputs_are_quantized_in_the_trained_model():
    model, x = trained_resnet()
    captured = {}
    model.features[5].relu.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    with torch.no_grad():
        model(x[:8])
    quantizer = model.features[5].relu.output_quantizer
    scale, zero_point = (float(t.reshape(-1)[0]) for t in quantizer.qparams())
    levels = captured["out"] / scale + zero_point
    assert torch.allclose(levels, levels.round(), atol=1e-3) and zero_point == 0  # on the uint8 grid, after the ReLU


def test_state_dict_round_trip_and_unprepare():
    model, x = trained_resnet()
    set_phase(model, observing=False, quantizing=True)  # ranges as stored (a weight's would follow the last step)
    state = model.state_dict()
    assert "features.5.relu.output_quantizer.scale" in state
    fresh = ResNet20((3, 16, 16), 10, width=4)
    prepare_qat(fresh, QATConfig())
    fresh.load_state_dict(state)  # strict: the same quantizers in the same places
    set_phase(fresh, observing=False, quantizing=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    plain = ResNet20((3, 16, 16), 10, width=4)
    plain.load_state_dict(float_state_dict(state))  # strict, into the unmodified class
    unprepare(fresh)
    assert not tensor_quantizers(fresh) and not all_quantizers(fresh)
    assert fresh.state_dict().keys() == plain.state_dict().keys()


def test_set_phase_on_the_model_reaches_the_tensor_quantizers():
    model, _ = trained_resnet()
    set_phase(model, observing=False, quantizing=False)
    assert not any(q.quantizing for q in all_quantizers(model))
    assert not model.features[7].relu.output_quantizer.quantizing


class TopLevelSum(nn.Module):
    """A residual sum written at the model's top level with a function: no module produces the addition's output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.b(self.a(x)) + x))


def test_an_addition_no_module_produces_stays_float_with_a_warning(tmp_path):
    model = TopLevelSum()
    with pytest.warns(UserWarning, match=r"1 addition\(s\).*stay in float.*add"):
        prepare_qat(model, QATConfig())
    assert not tensor_quantizers(model)
    x = torch.randn(16, 3, 8, 8)
    model.train()
    model(x)
    model.eval()
    path = export_onnx(model, tmp_path / "m.onnx", x)  # still exact, only slower
    assert "Add" in ort_optimized_kernels(path, tmp_path)


def test_inputs_only_has_no_tensor_quantizers_and_no_warning():
    model = TopLevelSum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_qat(model, QATConfig(quantize_outputs=False))
    assert not tensor_quantizers(model)


def test_a_layer_with_its_own_activation_bits_keeps_its_own_input_quantizer():
    torch.manual_seed(0)
    model = ResNet20((3, 16, 16), 10, width=4)
    prepare_qat(model, QATConfig(layer_bits={r"features\.4\.body\.0$": {"activation_bits": 4}}))
    layer = model.features[4].body[0]
    assert layer.input_quantizer is not model.features[3].relu.output_quantizer
    assert layer.input_quantizer.spec.bits == 4
    assert model.features[5].body[0].input_quantizer is model.features[4].relu.output_quantizer


def test_a_prepared_resnet_pickles_with_its_hooks(tmp_path):
    model, x = trained_resnet()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and torch.equal(clone(x), model(x))
    assert set(tensor_quantizers(loaded)) == set(tensor_quantizers(model))


def test_compact_resnet_keeps_its_residual_quantizers_through_export(tmp_path):
    from lightning_compress import export_compact
    from lightning_compress.pruning import prune_channel_groups_

    torch.manual_seed(0)
    model = ResNet20((3, 16, 16), 10, width=8)
    x = torch.randn(32, 3, 16, 16)
    prune_channel_groups_(model, x, 0.25, scope="layer")
    layers = prepare_qat(model, QATConfig())
    model.train()
    with torch.no_grad():
        model(x)  # observe (no step: the pruned channels stay zero)
        for bn in folded_batchnorms(layers):
            bn.eval()
        model(x)
    model.eval()
    compact = export_compact(model, x)
    assert set(tensor_quantizers(compact)) == set(tensor_quantizers(model))
    assert compact.features[4].body[0].input_quantizer is compact.features[3].relu.output_quantizer
    path = export_onnx(compact, tmp_path / "compact.onnx", x)
    kernels = ort_optimized_kernels(path, tmp_path)
    assert kernels.count("QLinearAdd") == 9 and not {"Conv", "FusedConv", "Add"} & set(kernels)


class TorchvisionStyleBlock(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module called twice, ``out += identity``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def test_a_relu_module_called_twice_lets_the_block_host_its_output(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        TorchvisionStyleBlock(8), TorchvisionStyleBlock(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    plan = quantization_plan(model, names, residuals=True)
    assert set(plan.tensor_hosts) == {"2", "3", "4"} and not plan.float_additions
    assert plan.shared_inputs == {"3.conv1": "2", "4.conv1": "3"}
    layers = prepare_qat(model, QATConfig())
    x = torch.randn(32, 3, 8, 8)
    model.train()
    with torch.no_grad():
        model(x)
        for bn in folded_batchnorms(layers):
            bn.eval()
        model(x)
    model.eval()
    path = export_onnx(model, tmp_path / "m.onnx", x)
    kernels = ort_optimized_kernels(path, tmp_path)
    assert kernels.count("QLinearAdd") == 2 and not {"Conv", "FusedConv", "Add"} & set(kernels)


def test_a_channel_pruned_whole_keeps_its_folded_bias_through_quantization_and_export(tmp_path):
    """A depthwise channel whose weights are all pruned still outputs its (folded BatchNorm) bias: its weight scale is
    1, not the smallest float, so the bias fits the int32 grid input scale × weight scale — in the fake-quantized model
    and in the int8 file alike (found on torchvision's mobilenet_v2: 80 % unstructured pruning empties 3×3 channels)."""
    import onnxruntime as ort

    from lightning_compress import QATConfig, export_onnx, quantize_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        net[0].weight[1].zero_()  # channel 1 pruned whole
        net[1].bias.copy_(torch.tensor([0.1, 5.0, -0.2, 0.3]))
        net[1].running_mean.uniform_(-0.1, 0.1)
    net.eval()
    x = [torch.rand(8, 4, 6, 6) * 0.05 for _ in range(4)]  # small activations: a small input scale
    with torch.no_grad():
        expected = net(x[0])
    quantize_(net, QATConfig(), x)
    with torch.no_grad():
        fake = net(x[0])
    assert torch.allclose(fake[:, 1], expected[:, 1], atol=0.05)  # the bias survives (it was clamped to ~0.3 before)
    path = export_onnx(net, tmp_path / "m.onnx", x[0])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x[0].numpy()})[0]
    assert abs(got[:, 1] - fake[:, 1].numpy()).max() < 1e-4


def drop_path(x: Tensor, training: bool) -> Tensor:
    if not training:
        return x
    return x * (torch.rand(x.shape[0], 1, 1, 1) > 0.1).to(x.dtype) / 0.9


torch.fx.wrap("drop_path")  # as torchvision wraps its stochastic_depth: a leaf for torch.fx


class DropPath(nn.Module):
    """timm's DropPath / torchvision's StochasticDepth: random in training, the identity in evaluation."""

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.training)


class MBConvLike(nn.Module):
    """torchvision's MBConv (EfficientNet) and CNBlock (ConvNeXt, ``scaled``): the branch passes through StochasticDepth
    before the residual addition, which only blocks that keep their shape have."""

    def __init__(self, c: int, residual: bool = True, scaled: bool = False) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))  # fmt: skip
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), 0.5)) if scaled else None
        self.stochastic_depth, self.residual = DropPath(), residual

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x) if self.layer_scale is None else self.layer_scale * self.block(x)
        if self.residual:
            result = self.stochastic_depth(result)
            result += x
        return result


def test_modules_that_are_the_identity_in_evaluation_do_not_break_the_export(tmp_path):
    torch.manual_seed(0)
    # Each block's input is a linear bottleneck (Conv + BatchNorm, no activation), as in EfficientNet and ConvNeXt.
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), MBConvLike(8),
        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), MBConvLike(8, scaled=True),
        MBConvLike(8, residual=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    prepare_qat(net, QATConfig())
    hosts = tensor_quantizers(net)
    assert {"2.stochastic_depth", "5.stochastic_depth"} <= set(hosts)  # the tensors entering the additions
    x = torch.randn(32, 1, 8, 8)
    for _ in range(3):
        net(x)
    set_phase(net, observing=False, quantizing=True)
    net.eval()
    path = export_onnx(net, tmp_path / "droppath.int8.onnx", x)  # raised "could not find the output of module ..."
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert (torch.from_numpy(out).argmax(1) == net(x).argmax(1)).float().mean() >= 0.995


def test_output_quantizers_learn_while_batchnorm_trains_so_every_conv_runs_on_integers(tmp_path):
    """The default path of a verb user: prepare_qat, training steps with BatchNorm in training mode (never frozen),
    export. Before, the convs' output quantizers observed nothing while their BatchNorm trained, the export left them
    out without a word, and ONNX Runtime kept the convs before each residual addition in float (torchvision's resnet18:
    9 of 20 convolutions integer, slower than fp32)."""
    torch.manual_seed(0)
    model = ResNet20((3, 16, 16), 10, width=4)
    prepare_qat(model, QATConfig())
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    qat_steps(model, x, y, steps=4)
    kernels = ort_optimized_kernels(export_onnx(model, tmp_path / "resnet.onnx", x), tmp_path)
    assert kernels.count("QLinearConv") == 21 and kernels.count("QLinearAdd") == 9
    assert not {"Conv", "FusedConv", "Add", "Gemm"} & set(kernels)


def test_relu6_blocks_fuse_into_integer_convolutions(tmp_path):
    """MobileNet's Conv → BatchNorm → ReLU6: the tensor after the ReLU6 is quantized (ONNX Runtime drops a Clip from 0
    after a QuantizeLinear, and its bounds are written as constants), so every conv runs as QLinearConv — before, the
    ReLU6's bounds came as CastLike nodes that ONNX Runtime cannot fold, the Clip stayed, and torchvision's mobilenet_v2
    ran 34 of 52 convolutions in float (0.44× of fp32)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    prepare_qat(model, QATConfig())
    x, y = torch.randn(64, 3, 12, 12), torch.randint(0, 10, (64,))
    qat_steps(model, x, y, steps=4)
    kernels = ort_optimized_kernels(export_onnx(model, tmp_path / "relu6.onnx", x), tmp_path)
    assert kernels.count("QLinearConv") == 3 and "Conv" not in kernels and "FusedConv" not in kernels
    # every ReLU6 is gone — also the last one, before the pooling: the tensor after it is quantized (by the ReLU6
    # module), not the conv's output before it, which left a float Clip after a DequantizeLinear
    assert "Clip" not in kernels


class Bottleneck(nn.Module):
    """MobileNetV2's inverted residual: expand, activate, project — no activation after the projection (a linear
    bottleneck) — and the input added back when ``residual``."""

    def __init__(self, channels: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.conv = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1), nn.BatchNorm2d(2 * channels), nn.ReLU6(),
                                  nn.Conv2d(2 * channels, channels, 1), nn.BatchNorm2d(channels))  # fmt: skip

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def test_a_block_output_read_by_the_next_conv_and_an_addition_is_quantized_once(tmp_path):
    """A block without a residual feeding a block with one: its output is an addition's input (quantized on its own
    grid) and the next conv's input. The next conv reads it on that grid — before, it quantized it again, and ONNX
    Runtime ran a DequantizeLinear → QuantizeLinear round trip between the two integer convolutions (5 of them in
    torchvision's mobilenet_v2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), Bottleneck(8, False),
                          Bottleneck(8, True), Bottleneck(8, True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))  # fmt: skip
    prepare_qat(model, QATConfig())
    x, y = torch.randn(64, 3, 12, 12), torch.randint(0, 10, (64,))
    qat_steps(model, x, y, steps=4)
    assert model[4].conv[0].input_quantizer is model[3].conv[3].output_quantizer
    path = export_onnx(model, tmp_path / "bottleneck.onnx", x)
    kernels = ort_optimized_kernels(path, tmp_path)
    graph = onnx.load(tmp_path / "optimized.onnx").graph
    readers = {name: [n.op_type for n in graph.node if name in n.input] for n in graph.node for name in n.output}
    round_trips = [
        n.name for n in graph.node if n.op_type == "DequantizeLinear" and readers[n.output[0]] == ["QuantizeLinear"]
    ]
    assert not round_trips
    assert kernels.count("QLinearConv") == 7 and kernels.count("QLinearAdd") == 2 and "Conv" not in kernels


def test_output_quantizers_observe_during_the_observer_calibration_before_quantizing(tmp_path):
    """QuantizationAwareTraining calibrates the observers in float before it quantizes; the output quantizers must
    observe then too. Before, they did not — and once the observers froze, the export silently left those outputs
    unquantized (the app's deep-compression recipe with start_epoch 3 and freeze_observers_epoch 4)."""
    torch.manual_seed(0)
    model = ResNet20((3, 16, 16), 10, width=4)
    prepare_qat(model, QATConfig())
    set_phase(model, observing=True, quantizing=False)  # the calibration phase
    qat_steps(model, torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,)), steps=2)
    outputs = {n: q for n, m in quantized_layers(model).items() if (q := getattr(m, "output_quantizer", None))}
    assert outputs and all(q.initialized for q in outputs.values())
    set_phase(model, observing=False, quantizing=True)  # frozen, quantizing: the export finds every range
    kernels = ort_optimized_kernels(export_onnx(model, tmp_path / "calibrated.onnx", torch.randn(64, 3, 16, 16)),
                                    tmp_path)  # fmt: skip
    assert kernels.count("QLinearConv") == 21 and "Conv" not in kernels


class SqueezeExcite(nn.Module):
    """EfficientNet's squeeze-and-excitation: a gate per channel from the pooled input, ``scale * input``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool, self.fc1, self.act = nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 4, 1), nn.SiLU()
        self.fc2, self.scale = nn.Conv2d(4, channels, 1), nn.Sigmoid()

    def forward(self, x):
        return self.scale(self.fc2(self.act(self.fc1(self.pool(x))))) * x


def test_silu_and_squeeze_excitation_gates_run_on_integer_kernels(tmp_path):
    """EfficientNet's SiLU (x · sigmoid(x)) and squeeze-and-excitation (sigmoid(…) · x): every sigmoid and product is
    quantized, so ONNX Runtime runs them as QLinearSigmoid and QLinearMul — before, each ran in float between a
    DequantizeLinear and a QuantizeLinear (torchvision's efficientnet_b0: 65 of each, 0.86× the speed of ONNX Runtime's
    own quantize_static, which quantizes them)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.SiLU(), SqueezeExcite(8),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    prepare_qat(model, QATConfig())
    x, y = torch.randn(64, 3, 12, 12), torch.randint(0, 10, (64,))
    qat_steps(model, x, y, steps=4)
    path = export_onnx(model, tmp_path / "gates.onnx", x)
    kernels = ort_optimized_kernels(path, tmp_path)
    # four SiLUs (three after the convs, one inside the gate) and the gate's sigmoid; five products
    assert kernels.count("QLinearSigmoid") == 5 and kernels.count("QLinearMul") == 5, kernels
    assert not {"Sigmoid", "Mul", "QuickGelu", "Conv", "FusedConv"} & set(kernels)
    assert kernels.count("QLinearConv") == 5
    unprepare(model)  # the SiLUs are plain again
    assert all(type(m) is nn.SiLU and not list(m.children()) for m in model.modules() if isinstance(m, nn.SiLU))
