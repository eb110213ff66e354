"""Cropping (METHOD.md section 3 and invariants 9-15 of section 11) against a re-statement."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from ncd.config import CropConfig
from ncd.preprocess.crops import (
    box_gap,
    crop_boxes,
    crop_regions,
    mask_to_image_size,
    merge_parity,
    merge_union_find,
    pil_round,
    region_boxes,
    score_map_to_image_size,
)

PARITY = CropConfig()
UNION = CropConfig(merge="union_find")


# ---------------------------------------------------------------- re-statement of METHOD 3


def ref_gap(a, b) -> float:
    """Distance of METHOD 3.2 from centres and half sizes."""
    wa, ha, wb, hb = a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]
    dx = abs((a[0] + wa / 2) - (b[0] + wb / 2))
    dy = abs((a[1] + ha / 2) - (b[1] + hb / 2))
    sx, sy = (wa + wb) / 2, (ha + hb) / 2
    if dx < sx and dy >= sy:
        return dy - sy
    if dx >= sx and dy < sy:
        return dx - sx
    if dx >= sx and dy >= sy:
        return math.sqrt((dx - sx) ** 2 + (dy - sy) ** 2)
    return -1


def ref_boxes(mask: np.ndarray, est: int, padding=0.1, merge_dist=0.01, min_size=0.1) -> list:
    h_img, w_img = mask.shape
    longest = max(h_img, w_img)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    rects = [list(cv2.boundingRect(c)) for c in contours]
    if not rects:
        boxes = [(0, 0, w_img, h_img)]
    else:
        boxes = []
        for _, (x, y, w, h) in sorted((r[2] * r[3], r) for r in rects):
            cy, cx = int((2 * y + h) * 0.5), int((2 * x + w) * 0.5)
            r = max(int(max(h, w) * (1 + padding) * 0.5), int(longest * min_size))
            r = min(r, int(longest * 0.5))
            x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
            if x0 < 0:
                x0, x1 = 0, 2 * r
            elif x1 > w_img:
                x0, x1 = w_img - 2 * r, w_img
            if y0 < 0:
                y0, y1 = 0, 2 * r
            elif y1 > h_img:
                y0, y1 = h_img - 2 * r, h_img
            boxes.append((x0, y0, x1, y1))
    limit = int(longest * merge_dist)
    close = {}
    for a in boxes:
        close[a] = sorted(b for b in boxes if ref_gap(a, b) < limit)
    groups = []
    for g in close.values():
        if g not in groups:
            groups.append(g)
    dropped = [g for g in groups for other in groups if g != other and set(g).issubset(other)]
    groups = [g for g in groups if g not in dropped]
    for g in groups:
        for b in g:
            if b in boxes:
                boxes.remove(b)
        m = g[0]
        for b in g[1:]:
            m = (min(m[0], b[0]), min(m[1], b[1]), max(m[2], b[2]), max(m[3], b[3]))
            w, h = m[2] - m[0], m[3] - m[1]
            if w > h:
                m = (m[0], m[1] - (w - h) / 2, m[2], m[3] + (w - h) / 2)
            elif h > w:
                m = (m[0] - (h - w) / 2, m[1], m[2] + (h - w) / 2, m[3])
        boxes.append(m)
    boxes = sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
    return boxes[: est + 1] if len(boxes) > est else boxes


def ref_crops(image, mask, norm_map, est):
    """PIL crops, mode-"1" mask crops and F-image scores, as upstream saves them."""
    boxes = ref_boxes(mask, est)
    pil_image = Image.fromarray(image).convert("RGB")
    pil_mask = Image.fromarray(mask).convert("1")
    resized = Image.fromarray(norm_map.astype(np.float64)).resize(pil_image.size)
    out = []
    for box in boxes:
        crop_mask = np.asarray(pil_mask.crop(box).convert("L"))
        score = float(np.max(np.asarray(resized.crop(box)))) / 255.0
        out.append((np.asarray(pil_image.crop(box)), crop_mask, score))
    return boxes, out


# ---------------------------------------------------------------- synthetic masks


def blobs_mask(rng: np.random.Generator, shape, n_blobs: int, max_radius: int, edge: float = 1.0):
    """Filled ellipses; ``edge`` < 1 keeps centres within that fraction of a corner."""
    mask = np.zeros(shape, np.uint8)
    for _ in range(n_blobs):
        cx, cy = int(rng.integers(0, max(1, edge * shape[1]))), int(rng.integers(0, max(1, edge * shape[0])))
        if edge < 1 and rng.random() < 0.5:
            cx, cy = shape[1] - 1 - cx, shape[0] - 1 - cy
        center = (cx, cy)
        axes = (int(rng.integers(1, max_radius)), int(rng.integers(1, max_radius)))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    return mask


def rect_mask(shape, rects) -> np.ndarray:
    """Mask with filled rectangles (x, y, w, h)."""
    mask = np.zeros(shape, np.uint8)
    for x, y, w, h in rects:
        mask[y : y + h, x : x + w] = 255
    return mask


def random_image(rng, shape) -> np.ndarray:
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


# ---------------------------------------------------------------- invariant 9


def test_empty_mask_gives_one_whole_image_crop():
    rng = np.random.default_rng(0)
    image = random_image(rng, (120, 200))
    regions = crop_regions(image, np.zeros((120, 200), np.uint8), np.zeros((120, 200), np.float32), 3, PARITY)
    assert len(regions) == 1
    (region,) = regions
    assert region.box == (0, 0, 200, 120)
    np.testing.assert_array_equal(region.crop, image)
    assert region.mask.shape == (120, 200) and not region.mask.any() and region.area == 0


# ---------------------------------------------------------------- invariant 10, 11


def test_small_region_gives_minimum_crop_centred():
    mask = rect_mask((1000, 1000), [(490, 590, 21, 11)])
    ((x0, y0, x1, y1),) = crop_boxes(mask, 1, PARITY)
    assert (x1 - x0, y1 - y0) == (200, 200)
    assert ((x0 + x1) // 2, (y0 + y1) // 2) == (500, 595)


@pytest.mark.parametrize(
    "rect, expected",
    [
        ((3, 500, 10, 10), (0, 405, 200, 605)),  # left border: shifted right
        ((990, 2, 8, 8), (800, 0, 1000, 200)),  # top-right corner
        ((400, 995, 5, 5), (302, 800, 502, 1000)),  # bottom border
    ],
)
def test_minimum_crop_is_shifted_inside_near_borders(rect, expected):
    assert crop_boxes(rect_mask((1000, 1000), [rect]), 1, PARITY) == [expected]


@pytest.mark.parametrize("side", [300, 401, 555, 700])
def test_large_region_crop_side(side):
    mask = rect_mask((1000, 1000), [(100, 150, side, side // 2)])
    ((x0, y0, x1, y1),) = crop_boxes(mask, 1, PARITY)
    expected = min(2 * int(side * 1.1 * 0.5), 1000)
    assert x1 - x0 == y1 - y0 == expected
    assert expected == min(2 * math.floor(0.55 * side + 1e-9), 1000)


def test_crop_side_is_capped_by_the_longer_side_and_may_leave_a_short_image():
    mask = rect_mask((300, 1000), [(20, 20, 950, 250)])
    ((x0, y0, x1, y1),) = crop_boxes(mask, 1, PARITY)
    assert (x1 - x0, y1 - y0) == (1000, 1000)
    assert y0 == 0 and y1 == 1000  # sticks out of the 300-px height
    image = np.full((300, 1000, 3), 200, np.uint8)
    (region,) = crop_regions(image, mask, np.zeros((300, 1000), np.float32), 1, PARITY)
    assert region.crop.shape == (1000, 1000, 3)
    assert (region.crop[300:] == 0).all() and (region.crop[:300] == 200).all()


# ---------------------------------------------------------------- invariant 12 and merging


def test_close_regions_merge_into_one_square_crop():
    # boxes 200 wide centred at x=205 and x=414: gap 9 px < 10 (1% of 1000)
    mask = rect_mask((1000, 1000), [(200, 500, 10, 10), (409, 500, 10, 10)])
    boxes = crop_boxes(mask, 2, PARITY)
    assert len(boxes) == 1
    x0, y0, x1, y1 = boxes[0]
    assert x1 - x0 == y1 - y0
    assert x0 <= 200 and x1 >= 419 and y0 <= 500 and y1 >= 510


def test_regions_at_the_merge_distance_stay_apart():
    mask = rect_mask((1000, 1000), [(200, 500, 10, 10), (410, 500, 10, 10)])  # gap exactly 10
    assert len(crop_boxes(mask, 2, PARITY)) == 2
    far = rect_mask((1000, 1000), [(100, 100, 10, 10), (800, 800, 10, 10)])
    assert len(crop_boxes(far, 2, PARITY)) == 2


def test_box_gap_cases():
    assert box_gap((0, 0, 10, 10), (5, 5, 15, 15)) == -1
    assert box_gap((0, 0, 10, 10), (13, 2, 20, 8)) == 3
    assert box_gap((0, 0, 10, 10), (2, 14, 8, 20)) == 4
    assert box_gap((0, 0, 10, 10), (13, 14, 20, 20)) == 5
    assert box_gap((0, 0, 10, 10), (10, 0, 20, 10)) == 0  # touching is not overlapping


def test_chain_is_not_merged_transitively_in_parity():
    a, b, c, d = (0, 0, 100, 100), (105, 0, 205, 100), (210, 0, 310, 100), (315, 0, 415, 100)
    merged = merge_parity([a, b, c, d], (1000, 1000), PARITY)
    assert len(merged) == 2
    first, second = sorted(merged)
    assert first[0] == 0 and first[2] == 310 and second[0] == 105 and second[2] == 415
    assert box_gap(first, second) == -1  # the two outputs overlap
    assert first[1] == -105.0 and first[3] == 205.0  # squared with floats, not clamped
    ((x0, y0, x1, y1),) = merge_union_find([a, b, c, d], (1000, 1000), UNION)
    assert (x0, x1) == (0, 415) and y1 - y0 == 415 and y0 >= 0  # one group, shifted inside


def test_union_find_keeps_boxes_inside_the_image():
    rng = np.random.default_rng(5)
    for trial in range(40):
        shape = (int(rng.integers(80, 400)), int(rng.integers(80, 400)))
        mask = blobs_mask(rng, shape, int(rng.integers(1, 9)), max(shape) // 6, 1.0 if trial % 2 else 0.2)
        for x0, y0, x1, y1 in crop_boxes(mask, 20, UNION):
            assert 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]
            assert x1 - x0 == y1 - y0 or x1 - x0 == shape[1] or y1 - y0 == shape[0]
        for region in crop_regions(random_image(rng, shape), mask, np.zeros(shape, np.float32), 20, UNION):
            x0, y0, x1, y1 = region.box
            assert region.area == np.count_nonzero(mask[y0:y1, x0:x1])


def test_union_find_groups_are_the_connected_components_of_closeness():
    rng = np.random.default_rng(6)
    n_joined = 0
    for _ in range(30):
        shape = (300, 300)
        singles = region_boxes(blobs_mask(rng, shape, int(rng.integers(2, 10)), 30), UNION)
        limit = int(300 * UNION.max_merge_dist)
        seen, components = set(), []
        for start in range(len(singles)):  # breadth-first search over the closeness graph
            if start in seen:
                continue
            todo, comp = [start], []
            seen.add(start)
            while todo:
                i = todo.pop()
                comp.append(singles[i])
                for j in range(len(singles)):
                    if j not in seen and box_gap(singles[i], singles[j]) < limit:
                        seen.add(j)
                        todo.append(j)
            components.append(comp)
        merged = merge_union_find(singles, shape, UNION)
        assert len(merged) == len(components)
        n_joined += len(components) < len(singles)
        for comp in components:  # each group's union, inside the image, is covered by an output box
            ux0, uy0 = max(min(b[0] for b in comp), 0), max(min(b[1] for b in comp), 0)
            ux1, uy1 = min(max(b[2] for b in comp), 300), min(max(b[3] for b in comp), 300)
            assert any(m[0] <= ux0 and m[1] <= uy0 and m[2] >= ux1 and m[3] >= uy1 for m in merged)
    assert n_joined > 0


def test_unknown_merge_mode_is_rejected():
    with pytest.raises(ValueError):
        crop_boxes(rect_mask((50, 50), [(5, 5, 5, 5)]), 1, CropConfig(merge="bogus"))


# ---------------------------------------------------------------- invariant 13, 15 and PIL parity


@pytest.mark.parametrize("est", [0, 1, 2, 4])
def test_crop_count_and_order(est):
    rng = np.random.default_rng(est)
    for _ in range(15):
        shape = (int(rng.integers(100, 300)), int(rng.integers(100, 300)))
        mask = blobs_mask(rng, shape, int(rng.integers(0, 8)), 25)
        regions = crop_regions(random_image(rng, shape), mask, np.zeros(shape, np.float32), est, PARITY)
        assert 1 <= len(regions) <= est + 1
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in crop_boxes(mask, est, PARITY)]
        assert areas == sorted(areas, reverse=True)
        for r in regions:
            h, w = r.box[3] - r.box[1], r.box[2] - r.box[0]
            assert r.crop.shape == (h, w, 3) and r.crop.dtype == np.uint8
            assert r.mask.shape == (h, w) and r.mask.dtype == np.uint8
            assert set(np.unique(r.mask)) <= {0, 255}
            assert r.area == int(np.count_nonzero(r.mask == 255))


def test_random_masks_match_the_restatement_and_pil():
    rng = np.random.default_rng(42)
    n_merged = n_duplicates = 0
    for trial in range(80):
        shape = (int(rng.integers(60, 320)), int(rng.integers(60, 320)))
        edge = 1.0 if trial % 3 else 0.15
        mask = blobs_mask(rng, shape, int(rng.integers(0, 12)), max(4, max(shape) // 8), edge)
        singles = region_boxes(mask, PARITY)
        n_duplicates += len(set(singles)) < len(singles)
        est = int(rng.integers(0, 6))
        image = random_image(rng, shape)
        small = rng.random((max(8, shape[0] // 4), max(8, shape[1] // 4))) * 255
        small[rng.random(small.shape) < 0.3] = 0
        norm = small.astype(np.float64)
        score_map = score_map_to_image_size(norm, shape)
        boxes = crop_boxes(mask, est, PARITY)
        expected_boxes, expected = ref_crops(image, mask, norm, est)
        assert boxes == expected_boxes
        assert [type(v) for b in boxes for v in b] == [type(v) for b in expected_boxes for v in b]
        n_merged += sum(isinstance(v, float) for b in boxes for v in b) > 0
        regions = crop_regions(image, mask, score_map, est, PARITY)
        assert len(regions) == len(expected)
        for region, box, (crop, crop_mask, score) in zip(regions, boxes, expected):
            assert region.box == pil_round(box)
            np.testing.assert_array_equal(region.crop, crop)
            np.testing.assert_array_equal(region.mask, crop_mask)
            assert region.score == pytest.approx(min(max(score, 0.0), 1.0), abs=1e-7)
    assert n_merged > 0 and n_duplicates > 0  # float (merged) and duplicate boxes exercised


def test_duplicate_boxes_near_a_corner():
    mask = rect_mask((1000, 1000), [(5, 5, 4, 4), (30, 12, 6, 6), (500, 500, 8, 8)])
    singles = region_boxes(mask, PARITY)
    assert singles.count((0, 0, 200, 200)) == 2
    assert crop_boxes(mask, 5, PARITY) == ref_boxes(mask, 5) == [(0, 0, 200, 200), (404, 404, 604, 604)]


# ---------------------------------------------------------------- PIL rounding and padding


def test_float_boxes_are_rounded_like_pil_and_padded_black():
    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    for box in [(-2.5, 0.5, 3.5, 2.5), (27.5, 17.5, 33.5, 21.5), (1.5, -1.5, 4.5, 1.5)]:
        ibox = pil_round(box)
        expected = np.asarray(Image.fromarray(image).crop(box))
        assert expected.shape[:2] == (ibox[3] - ibox[1], ibox[2] - ibox[0])
    assert pil_round((-2.5, 0.5, 3.5, 2.5)) == (-2, 0, 4, 2)
    assert pil_round((1.5, -1.5, 4.5, 1.5)) == (2, -2, 4, 2)


def test_merged_box_with_half_coordinates_crops_like_pil():
    # regions give boxes of different sizes; the union is not square -> .5 coordinates
    mask = rect_mask((200, 300), [(100, 90, 5, 5), (135, 95, 40, 39)])
    (box,) = crop_boxes(mask, 3, PARITY)
    assert any(isinstance(v, float) and v % 1 == 0.5 for v in box)
    image = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    (region,) = crop_regions(image, mask, np.zeros((200, 300), np.float32), 3, PARITY)
    np.testing.assert_array_equal(region.crop, np.asarray(Image.fromarray(image).crop(box)))


# ---------------------------------------------------------------- invariant 14


def test_score_is_box_max_over_255():
    shape = (400, 400)
    score_map = np.zeros(shape, np.float32)
    score_map[100, 100] = 204.0
    score_map[300, 320] = 51.0
    mask = rect_mask(shape, [(95, 95, 10, 10), (310, 310, 10, 10)])
    regions = crop_regions(np.zeros((*shape, 3), np.uint8), mask, score_map, 5, PARITY)
    assert sorted(r.score for r in regions) == pytest.approx([0.2, 0.8])
    lowest = crop_regions(np.zeros((*shape, 3), np.uint8), mask, np.zeros(shape, np.float32), 5, PARITY)
    assert all(r.score == 0.0 for r in lowest)


def test_score_counts_padding_as_zero_and_stays_in_unit_range():
    shape = (100, 300)
    mask = rect_mask(shape, [(10, 10, 280, 80)])  # box side 300+ leaves the 100-px height
    negative = np.full(shape, -3.0, np.float32)
    (region,) = crop_regions(np.zeros((*shape, 3), np.uint8), mask, negative, 1, PARITY)
    assert region.box[3] - region.box[1] > 100 and region.score == 0.0
    over = np.full(shape, 260.0, np.float32)
    (region,) = crop_regions(np.zeros((*shape, 3), np.uint8), mask, over, 1, PARITY)
    assert region.score == 1.0


# ---------------------------------------------------------------- resizing


def test_mask_to_image_size_is_opencv_nearest():
    rng = np.random.default_rng(3)
    mask = np.where(rng.random((37, 53)) > 0.5, 255, 0).astype(np.uint8)
    for h, w in [(100, 130), (20, 17), (37, 53), (900, 901)]:
        out = mask_to_image_size(mask, (h, w))
        sy = np.minimum(np.floor(np.arange(h) * (1.0 / (h / 37))).astype(int), 36)
        sx = np.minimum(np.floor(np.arange(w) * (1.0 / (w / 53))).astype(int), 52)
        np.testing.assert_array_equal(out, mask[sy][:, sx])
    full = np.full((10, 10), 255, np.uint8)
    assert (mask_to_image_size(full, (30, 40)) == 255).all()  # no plt.imsave round-trip quirk


def test_score_map_to_image_size_matches_pil_default_resize():
    rng = np.random.default_rng(4)
    norm = rng.random((33, 47)) * 255
    expected = np.asarray(Image.fromarray(norm).resize((120, 90)))
    out = score_map_to_image_size(norm, (90, 120))
    assert out.dtype == np.float32 and out.shape == (90, 120)
    np.testing.assert_array_equal(out, expected)
    nearest = cv2.resize(norm.astype(np.float32), (120, 90), interpolation=cv2.INTER_NEAREST)
    assert not np.array_equal(out, nearest)
