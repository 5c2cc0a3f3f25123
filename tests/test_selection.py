import pytest
from torch import nn

from lightning_compress.core.selection import check_overrides_match, select_modules


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)


def names(selected):
    return [n for n, _ in selected]


def test_default_selects_conv_and_linear_only():
    assert names(select_modules(Net())) == ["stem", "body.0", "head"]


def test_include_and_exclude_are_searched_regexes():
    assert names(select_modules(Net(), include=r"body|head")) == ["body.0", "head"]
    assert names(select_modules(Net(), exclude=[r"^stem$", "head"])) == ["body.0"]


def test_include_that_matches_nothing_names_pattern_and_candidates():
    with pytest.raises(
        ValueError, match=r"`include` pattern 'encoder' matches no .* Candidates: 'stem', 'body.0', 'head'"
    ):
        select_modules(Net(), include=["head", "encoder"])


def test_nothing_left_and_no_prunable_weights():
    with pytest.raises(ValueError, match="No Conv1d/Conv2d/Conv3d/Linear module is left"):
        select_modules(Net(), exclude=".")
    with pytest.raises(ValueError, match="Candidates: none"):
        select_modules(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))


def test_invalid_regex():
    with pytest.raises(ValueError, match=r"`exclude` pattern '\(' is not a valid regular expression"):
        select_modules(Net(), exclude="(")


def test_override_patterns_must_match():
    with pytest.raises(ValueError, match=r"`layer_sparsity` pattern 'tail' matches no selected layer"):
        check_overrides_match([("stem", nn.Linear(1, 1)), ("head", nn.Linear(1, 1))], {"tail": 0.5}, "layer_sparsity")


def test_selectors_mean_the_same_on_any_model():
    from lightning_compress.core.selection import match_overrides

    net = Net()
    assert [n for n, _ in select_modules(net, include="@first")] == ["stem"]
    assert [n for n, _ in select_modules(net, include="@last")] == [[n for n, _ in select_modules(net)][-1]]
    assert [n for n, _ in select_modules(net, include="@Linear")] == [
        n for n, m in net.named_modules() if isinstance(m, nn.Linear)
    ]
    selected = select_modules(net)
    assert match_overrides(selected[0][0], {"@last": 8, "@first": 4}, selected) == 4
    with pytest.raises(ValueError, match=r"`include` selector '@1st' is not one of \('@first', '@last'\)"):
        select_modules(net, include="@1st")
    with pytest.raises(ValueError, match=r"pattern .@Embedding. matches no Conv1d/Conv2d/Conv3d/Linear/Embedding"):
        select_modules(net, include="@Embedding")
    with pytest.raises(TypeError, match=r"`include` must be a regular expression, an @selector or a list of them, "):
        select_modules(net, include=5)
