"""Sample grids (unite_core.pictures): which classes and how many per class `unite sample` draws, and the
grid's layout."""

import pytest
import torch

from unite_core.pictures import SampleOptionError, class_labels, image_grid, parse_classes


@pytest.mark.parametrize("text, want", [("0,1,2", [0, 1, 2]), ("0-4,7", [0, 1, 2, 3, 4, 7]), (" 3 ", [3]),
                                        (None, None), ("", None)])
def test_parse_classes(text, want):
    assert parse_classes(text) == want


@pytest.mark.parametrize("text", ["a", "1,,2", "1-x"])
def test_parse_classes_refuses_what_is_no_class_list(text):
    with pytest.raises(SampleOptionError, match="class ids like 0,1,2 or 0-4"):
        parse_classes(text)


def test_class_labels_defaults_and_range():
    assert class_labels(None, None, 10, 64) == (list(range(10)), 6)  # every class, num_samples spread over them
    assert class_labels("2-3", 5, 10, 64) == ([2, 3], 5)
    assert class_labels(None, None, 0, 8) == ([0], 8)  # an unconditional model: one row
    with pytest.raises(SampleOptionError, match=r"--classes \[12\] out of range: this model has 10 classes"):
        class_labels([3, 12], None, 10, 64)


def test_image_grid_lays_out_rows_and_upscales_small_tiles():
    grid = image_grid(torch.rand(6, 1, 8, 8), nrow=3, padding=2)
    assert grid.size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)
    big = image_grid(torch.rand(6, 3, 8, 8), nrow=3, padding=2, min_tile=32)
    assert big.size[0] >= 3 * 32 and big.mode == "RGB"
