import pytest
from torch import nn

from lightning_compress.selection import check_overrides_match, select_modules


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
        check_overrides_match(["stem", "head"], {"tail": 0.5}, "layer_sparsity")
