"""Co-segmentation / co-localization metrics, dataset readers and ``dffkit eval`` (issue 7)."""
import json

import numpy as np
import pytest
from PIL import Image

from dffkit import cli
from dffkit.deep_feature_factorization import dff
from dffkit.evaluation import (BoxSample, CosegSample, GroundTruthWarning, MissingMaskWarning, box_iou,
                               choose_concept, corloc, evaluate_coloc, evaluate_coseg, jaccard, load_mask,
                               precision, read_icoseg, read_voc, read_voc_annotation)

try:
    from dffkit.features import FeatureExtractor  # noqa: F401
    HAVE_EXTRACTOR = True
except ImportError:  # pragma: no cover
    HAVE_EXTRACTOR = False

needs_extractor = pytest.mark.skipif(not HAVE_EXTRACTOR, reason="dffkit.features is not importable")


# ---------------------------------------------------------------------------------------------
# metrics against hand-computed cases
# ---------------------------------------------------------------------------------------------

def test_jaccard_and_precision_by_hand():
    gt = np.zeros((4, 5), bool)
    gt[0:2, 0:2] = True                       # 4 pixels
    pred = np.zeros((4, 5), bool)
    pred[1:3, 1:3] = True                     # 4 pixels, 1 shared
    assert jaccard(pred, gt) == pytest.approx(1 / 7)
    # right: 1 shared foreground pixel + 20 - 7 background pixels
    assert precision(pred, gt) == pytest.approx((1 + 13) / 20)
    assert precision(pred, gt, convention="detection") == pytest.approx(1 / 4)
    assert jaccard(gt, gt) == 1.0 and precision(gt, gt) == 1.0
    empty = np.zeros_like(gt)
    assert jaccard(empty, empty) == 1.0 and jaccard(empty, gt) == 0.0
    assert precision(empty, gt, convention="detection") == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        jaccard(gt, gt[:3])
    with pytest.raises(ValueError, match="convention"):
        precision(gt, gt, convention="pixel")


def test_box_iou_and_corloc_by_hand():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0          # touching, x1 exclusive
    assert box_iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0             # empty boxes
    gts = [np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([[0, 0, 4, 4]])]
    preds = [(0, 0, 10, 12),      # IoU 100/120: hit
             (21, 21, 30, 30),    # second box, IoU 81/100: hit
             None]                # no box: miss
    assert corloc(preds, gts) == pytest.approx(2 / 3)
    assert corloc([(5, 0, 15, 10)], [gts[0]], threshold=0.3) == 1.0
    assert corloc([(5, 0, 15, 10)], [gts[0]]) == 0.0
    with pytest.raises(ValueError, match="2 predicted boxes for 1 images"):
        corloc(preds[:2], gts[:1])


# ---------------------------------------------------------------------------------------------
# readers on folders made here
# ---------------------------------------------------------------------------------------------

def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_load_mask_conventions(tmp_path):
    m = np.zeros((6, 8), np.uint8)
    m[2:4, 3:7] = 1
    _save(tmp_path / "ones.png", m)
    _save(tmp_path / "full.png", m * 255)
    _save(tmp_path / "rgb.png", np.repeat((m * 250)[..., None], 3, axis=2))
    for name in ("ones.png", "full.png", "rgb.png"):
        np.testing.assert_array_equal(load_mask(tmp_path / name), m.astype(bool))
    with pytest.warns(GroundTruthWarning, match="same aspect ratio, resized"):
        assert load_mask(tmp_path / "full.png", size=(12, 16)).sum() == m.sum() * 4


def test_read_icoseg_both_layouts(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    # iCoseg's own: <group>/<image>.jpg + <group>/GroundTruth/<image>.png
    a = tmp_path / "a"
    for group in ("bears", "kites"):
        for i in range(2):
            _save(a / group / f"{i}.jpg", img)
            _save(a / group / "GroundTruth" / f"{i}.png", mask)
    _save(a / "kites" / "no_mask.jpg", img)
    groups = read_icoseg(a)
    assert sorted(groups) == ["bears", "kites"]
    assert [s.image.endswith(f"{i}.jpg") for i, s in enumerate(groups["kites"])] == [True, True]
    assert all(isinstance(s, CosegSample) and "GroundTruth" in s.mask for s in groups["bears"])
    assert sorted(read_icoseg(a, groups=["bears"])) == ["bears"]
    # parallel trees: images/<group>/... and ground_truth/<group>/...; masks with a suffix too
    b = tmp_path / "b"
    _save(b / "images" / "cars" / "x.jpg", img)
    _save(b / "ground_truth" / "cars" / "x.png", mask)
    _save(b / "images" / "cars" / "y.jpg", img)
    _save(b / "images" / "cars" / "y_mask.png", mask)
    groups = read_icoseg(b)
    assert list(groups) == ["cars"] and len(groups["cars"]) == 2
    assert groups["cars"][1].mask.endswith("y_mask.png")
    with pytest.raises(ValueError, match="no images with ground-truth masks"):
        read_icoseg(tmp_path / "a" / "bears" / "GroundTruth")
    with pytest.raises(FileNotFoundError):
        read_icoseg(tmp_path / "nothing")


VOC_XML = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJ = """<object><name>{cls}</name><difficult>{d}</difficult>
  <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"""


def _voc(root, name, objects):
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    _save(root / "JPEGImages" / f"{name}.jpg", np.zeros((40, 50, 3), np.uint8))
    objs = "".join(VOC_OBJ.format(cls=c, d=d, x0=b[0], y0=b[1], x1=b[2], y1=b[3]) for c, d, b in objects)
    (root / "Annotations" / f"{name}.xml").write_text(VOC_XML.format(name=name, objects=objs, width=50, height=40))


def test_read_voc(tmp_path):
    _voc(tmp_path, "000001", [("cat", 0, (1, 1, 10, 20)), ("dog", 0, (5, 5, 30, 30)), ("cat", 1, (2, 2, 3, 3))])
    _voc(tmp_path, "000002", [("dog", 1, (1, 1, 50, 40))])
    ann = read_voc_annotation(tmp_path / "Annotations" / "000001.xml")
    assert isinstance(ann, BoxSample) and ann.size == (40, 50)
    np.testing.assert_array_equal(ann.boxes[0], [0, 0, 10, 20])   # 1-based inclusive -> 0-based exclusive
    assert ann.names == ["cat", "dog", "cat"] and ann.difficult == [False, False, True]
    groups = read_voc(tmp_path)
    assert sorted(groups) == ["cat", "dog"]
    assert len(groups["cat"]) == 1 and groups["cat"][0].boxes.shape == (1, 4)   # difficult dropped
    assert len(groups["dog"]) == 1                                               # 000002's only dog is difficult
    assert len(read_voc(tmp_path, skip_difficult=False)["dog"]) == 2
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("000002\n")
    assert list(read_voc(tmp_path, image_set="val", skip_difficult=False)) == ["dog"]
    with pytest.raises(FileNotFoundError, match="Annotations"):
        read_voc(tmp_path / "JPEGImages")
    (tmp_path / "Annotations" / "bad.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match="bad.xml"):
        read_voc(tmp_path)


# ---------------------------------------------------------------------------------------------
# evaluation of DFF results
# ---------------------------------------------------------------------------------------------

def _blocks():
    acts = np.zeros((2, 4, 4, 4), np.float32)
    acts[:, :2, :2] = 1.0   # concept "top": rows 0..1 of the feature grid
    acts[:, 2:, 2:] = 1.0
    images = [np.zeros((40, 40, 3), np.uint8)] * 2
    return images, acts


def test_evaluate_coseg_and_coloc_on_known_result(tmp_path):
    images, acts = _blocks()
    result = dff(images, 2, activations=acts)
    gt = np.zeros((40, 40), np.uint8)
    gt[:20] = 255
    _save(tmp_path / "gt.png", gt)
    samples = [CosegSample("a.png", str(tmp_path / "gt.png"), "g")] * 2
    report = evaluate_coseg(samples, result=result)
    top = int(result.labels[0][5, 20])
    assert report["concept"] == top and report["jaccard"] >= 0.9 and report["precision"] >= 0.95
    assert report["per_concept_jaccard"][1 - top] < 0.1
    boxes = [BoxSample("a.png", np.array([[0, 0, 40, 20]]))] * 2
    rep = evaluate_coloc(boxes, result=result)
    assert rep["concept"] == top and rep["corloc"] == 1.0
    assert choose_concept(result, "center") in (0, 1)
    with pytest.raises(ValueError, match="choose must be"):
        choose_concept(result, "best")


@needs_extractor
def test_cli_eval_icoseg_and_voc(tmp_path, capsys):
    from test_dff import coseg_set

    images, masks = coseg_set(n=4, size=64)
    root = tmp_path / "icoseg"
    for i, (im, m) in enumerate(zip(images, masks)):
        _save(root / "stripes" / f"{i}.jpg", im)
        _save(root / "stripes" / "GroundTruth" / f"{i}.png", m.astype(np.uint8) * 255)
    out = tmp_path / "coseg.json"
    assert cli.main(["eval", str(root), "-k", "3", "--out", str(out), "--backend", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["format"] == "icoseg" and report["groups"][0]["n_images"] == 4
    assert report["mean"]["jaccard"] >= 0.8
    assert "Jaccard" in capsys.readouterr().out

    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    for i, (im, m) in enumerate(zip(images, masks)):
        ys, xs = np.nonzero(m)
        _save(voc / "JPEGImages" / f"{i:06d}.jpg", im)
        obj = VOC_OBJ.format(cls="stripes", d=0, x0=xs.min() + 1, y0=ys.min() + 1, x1=xs.max() + 1, y1=ys.max() + 1)
        (voc / "Annotations" / f"{i:06d}.xml").write_text(VOC_XML.format(name=f"{i:06d}", objects=obj,
                                                                          width=im.shape[1], height=im.shape[0]))
    out = tmp_path / "coloc.json"
    assert cli.main(["eval", str(voc), "-k", "3", "--out", str(out), "--backend", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["format"] == "voc" and report["mean"]["corloc"] >= 0.75
    assert cli.main(["eval", str(tmp_path / "none")]) == 1


def test_per_image_results_choose_a_concept_in_each_image(tmp_path):
    images, acts = _blocks()
    result = dff(images, 2, activations=acts, mode="per_image")
    gt = np.zeros((40, 40), np.uint8)
    gt[:20] = 255
    _save(tmp_path / "gt.png", gt)
    report = evaluate_coseg([CosegSample("a.png", str(tmp_path / "gt.png"), "g")] * 2, result=result)
    assert report["concept"] is None and report["mode"] == "per_image"
    assert [r["concept"] for r in report["per_image"]] == [int(lab[5, 20]) for lab in result.labels]
    assert report["jaccard"] >= 0.9


# ---------------------------------------------------------------------------------------------
# regressions: bad <size>, argument checks, the output file and k checked before the work
# ---------------------------------------------------------------------------------------------

def test_read_voc_names_the_file_with_a_bad_size(tmp_path):
    _voc(tmp_path, "000001", [("cat", 0, (1, 1, 10, 20))])
    xml = tmp_path / "Annotations" / "000001.xml"
    xml.write_text(xml.read_text().replace("<height>40</height>", "<height>x</height>"))
    with pytest.raises(ValueError, match=r"000001\.xml: <size> must hold numbers, got height 'x'"):
        read_voc_annotation(xml)
    with pytest.raises(ValueError, match=r"000001\.xml"):
        read_voc(tmp_path)


def _two_groups(root, sizes=(("big", 2), ("small", 1))):
    """An iCoseg-style folder: group ``name`` with ``n`` images of 32 x 32 and their masks."""
    rng = np.random.default_rng(0)
    for name, n in sizes:
        for i in range(n):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            mask[8:24, 8:24] = 255
            _save(root / name / f"{i}.png", img)
            _save(root / name / "GroundTruth" / f"{i}.png", mask)
    return root


@pytest.mark.parametrize("argv, message", [
    (["--max-images", "0"], "argument --max-images: must be a positive int (images per group), got 0"),
    (["--max-images", "-1"], "argument --max-images: must be a positive int (images per group), got -1"),
    (["--image-size", "0"], "argument --image-size: must be a positive int (pixels), got 0"),
])
def test_cli_eval_refuses_non_positive_counts(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", str(tmp_path), *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


@needs_extractor
def test_cli_eval_max_images_limits_each_group(tmp_path):
    root = _two_groups(tmp_path / "ds")
    out = tmp_path / "ev.json"
    assert cli.main(["eval", str(root), "-k", "2", "--max-images", "1", "--image-size", "32", "--out", str(out),
                     "--backend", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert [g["n_images"] for g in report["groups"]] == [1, 1] and report["failed"] == []


@needs_extractor
def test_cli_eval_refuses_an_unusable_output_before_the_work(tmp_path, capsys, monkeypatch):
    from dffkit import evaluation

    monkeypatch.setattr(evaluation, "evaluate_coseg", lambda *a, **k: pytest.fail("evaluated in vain"))
    root = _two_groups(tmp_path / "ds")
    (tmp_path / "ev").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "ev", "is a folder: pass a file name"),
                         (tmp_path / "afile" / "ev.json", "which is a file, not a folder")):
        assert cli.main(["eval", str(root), "-k", "2", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"dffkit eval: error: --out {out}" in err and message in err and "Traceback" not in err
    out = tmp_path / "new" / "deeper" / "ev.json"  # missing folders are fine: created
    monkeypatch.setattr(evaluation, "evaluate_coseg", lambda samples, *a, **k: {
        "jaccard": 1.0, "precision": 1.0, "concept": 0, "n_images": len(samples)})
    assert cli.main(["eval", str(root), "-k", "2", "--out", str(out)]) == 0 and out.is_file()


@needs_extractor
def test_cli_eval_checks_k_against_every_group_first(tmp_path, capsys, monkeypatch):
    """At 16 x 16 the filter bank's feature grid is 2 x 2: 8 positions for the group of two
    images, 4 for the group of one; -k 6 fits the first only. Refused before any group runs,
    naming the group and the largest k."""
    from dffkit import evaluation

    root = _two_groups(tmp_path / "ds")
    calls = []
    real = evaluation.evaluate_coseg
    monkeypatch.setattr(evaluation, "evaluate_coseg", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "ev.json"
    base = ["eval", str(root), "--image-size", "16", "--out", str(out), "--backend", "cpu"]
    assert cli.main([*base, "-k", "6"]) == 1
    err = capsys.readouterr().err
    assert "-k 6 is larger than the number of feature positions" in err and "small (1 image: at most 4)" in err
    assert "big" not in err and "pass -k 4 or less" in err
    assert calls == [] and not out.exists()
    assert cli.main([*base, "-k", "6", "--per-image"]) == 1
    assert "big (2 images: at most 4), small (1 image: at most 4)" in capsys.readouterr().err
    assert calls == []
    assert cli.main([*base, "-k", "4"]) == 0 and len(calls) == 2
    # where the sizes are not known up front, the groups that fail are reported, the others kept
    monkeypatch.setattr(evaluation, "_group_positions", lambda *a, **k: None)
    assert cli.main([*base, "-k", "6"]) == 1
    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    assert [g["group"] for g in report["groups"]] == ["big"]
    assert [f["group"] for f in report["failed"]] == ["small"]
    assert "larger than the number of positions" in report["failed"][0]["error"]
    assert "1 of 2 groups failed (small)" in captured.err and "big" in captured.out


# ---------------------------------------------------------------------------------------------
# regressions (audit): masks read as the datasets store them, the frame of the ground truth,
# mask files never taken for images, skipped images reported, cheap checks before DFF
# ---------------------------------------------------------------------------------------------


def _object(h=40, w=60):
    """The mask of the masks below: a 20 x 30 block, 600 pixels."""
    m = np.zeros((h, w), bool)
    m[10:30, 20:50] = True
    return m


def _voc_palette():
    pal = [0] * 768
    pal[8 * 3: 8 * 3 + 3] = (64, 0, 0)           # VOC class 8 (cat): the darkest class colour
    pal[15 * 3: 15 * 3 + 3] = (192, 128, 128)    # class 15 (person)
    pal[255 * 3: 255 * 3 + 3] = (224, 224, 192)  # void
    return pal


def test_load_mask_reads_palette_colour_and_alpha_masks(tmp_path):
    m = _object()
    # adaptive palette: white gets index 0, black index 1 (read by index, the mask came out inverted)
    adaptive = Image.fromarray(m.astype(np.uint8) * 255).convert("P", palette=Image.ADAPTIVE, colors=2)
    adaptive.save(tmp_path / "adapt.png")
    assert Image.open(tmp_path / "adapt.png").getpalette()[:3] == [255, 255, 255]
    # colour masks: red and navy objects on black (thresholded luminance made them empty)
    for name, colour in (("red.png", (255, 0, 0)), ("navy.png", (0, 0, 128))):
        c = np.zeros(m.shape + (3,), np.uint8)
        c[m] = colour
        _save(tmp_path / name, c)
    # white object on a transparent background whose hidden colour is white too
    rgba = np.full(m.shape + (4,), 255, np.uint8)
    rgba[~m, 3] = 0
    _save(tmp_path / "white_on_clear.png", rgba)
    # a black stencil on a transparent background: the opaque pixels are the object
    stencil = np.zeros(m.shape + (4,), np.uint8)
    stencil[m, 3] = 255
    _save(tmp_path / "stencil.png", stencil)
    # a palette mask with a transparent index: the object in index 1, index 2 transparent
    idx = np.where(m, 1, 2).astype(np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette([0, 0, 0, 255, 255, 255, 255, 255, 255] + [0] * 759)
    p.save(tmp_path / "clear_index.png", transparency=2)
    for name in ("adapt.png", "red.png", "navy.png", "white_on_clear.png", "stencil.png", "clear_index.png"):
        np.testing.assert_array_equal(load_mask(tmp_path / name), m, err_msg=name)


def test_load_mask_voc_palette_void_and_grey_thresholds(tmp_path):
    m = _object()
    idx = np.zeros(m.shape, np.uint8)
    idx[m] = 8                                   # cat: (64, 0, 0), darker than 128 in every channel
    idx[5:8, 5:8] = 15                           # a person elsewhere: foreground too
    idx[9, 19:51] = 255                          # a void border above the cat
    p = Image.fromarray(idx, "P")
    p.putpalette(_voc_palette())
    p.save(tmp_path / "voc.png")
    mask, void = load_mask(tmp_path / "voc.png", return_void=True)
    expected = m.copy()
    expected[5:8, 5:8] = True
    np.testing.assert_array_equal(mask, expected)                 # void is not foreground
    assert void.sum() == 32 and void[9, 19:51].all()
    np.testing.assert_array_equal(load_mask(tmp_path / "voc.png"), expected)
    # grey masks: >= 128 is foreground, in L, in RGB copies of grey masks, and in 16 bits
    grey = np.zeros(m.shape, np.uint8)
    grey[m] = 200
    grey[0, :] = 100                             # anti-aliasing below the threshold: background
    _save(tmp_path / "grey.png", grey)
    _save(tmp_path / "grey_rgb.png", np.repeat(grey[..., None], 3, axis=2))
    Image.fromarray(m.astype(np.uint16) * 65535).save(tmp_path / "sixteen.png")
    Image.fromarray(m.astype(np.uint16) * 255).save(tmp_path / "sixteen_255.png")
    for name in ("grey.png", "grey_rgb.png", "sixteen.png", "sixteen_255.png"):
        np.testing.assert_array_equal(load_mask(tmp_path / name), m, err_msg=name)


def test_load_mask_warns_about_an_empty_or_full_mask(tmp_path):
    _save(tmp_path / "empty.png", np.zeros((8, 8), np.uint8))
    _save(tmp_path / "full.png", np.full((8, 8), 255, np.uint8))
    with pytest.warns(GroundTruthWarning, match=r"empty\.png is empty: no pixel reads as foreground"):
        assert not load_mask(tmp_path / "empty.png").any()
    with pytest.warns(GroundTruthWarning, match=r"full\.png covers the whole image"):
        assert load_mask(tmp_path / "full.png").all()


def test_load_mask_checks_the_frame(tmp_path):
    m = _object()                                                   # 60 x 40 (width x height)
    _save(tmp_path / "m.png", m.astype(np.uint8) * 255)
    with pytest.warns(GroundTruthWarning, match=r"m\.png is 60 x 40 pixels, the image 120 x 80: same aspect ratio"):
        big = load_mask(tmp_path / "m.png", size=(80, 120))
    np.testing.assert_array_equal(big, np.repeat(np.repeat(m, 2, axis=0), 2, axis=1))
    with pytest.raises(ValueError, match=r"m\.png is 60 x 40 pixels \(width x height\) but the image is 40 x 60: "
                                         r"their aspect ratios differ.*turned by 90 degrees"):
        load_mask(tmp_path / "m.png", size=(60, 40))               # transposed
    with pytest.raises(ValueError, match=r"m\.png is 60 x 40 .* but the image is 60 x 60"):
        load_mask(tmp_path / "m.png", size=(60, 60))


def test_read_icoseg_never_lists_a_mask_as_an_image(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    _save(tmp_path / "g" / "img0.jpg", img)
    _save(tmp_path / "g" / "img0.png", np.zeros((8, 8), np.uint8))   # its mask, next to it
    groups = read_icoseg(tmp_path)
    assert [(s.image, s.mask) for s in groups["g"]] == [(str(tmp_path / "g" / "img0.jpg"),
                                                         str(tmp_path / "g" / "img0.png"))]


def test_read_icoseg_matches_mask_extensions_in_any_case_and_reports_skipped(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    _save(tmp_path / "g" / "IMG0.JPG", img)
    _save(tmp_path / "g" / "GroundTruth" / "IMG0.PNG", mask)
    _save(tmp_path / "g" / "img1.jpg", img)
    _save(tmp_path / "g" / "GroundTruth" / "img1.PNG", mask)
    _save(tmp_path / "g" / "img2.jpeg", img)
    _save(tmp_path / "g" / "GroundTruth" / "img2.png", mask)
    for i in range(7):
        _save(tmp_path / "g" / f"lonely{i}.jpg", img)
    with pytest.warns(MissingMaskWarning, match=r"7 images under .* without a ground-truth mask left out: "
                                                r"g/lonely0\.jpg, .*, g/lonely4\.jpg and 2 more") as caught:
        groups = read_icoseg(tmp_path)
    assert [s.image.rsplit("/", 1)[1] for s in groups["g"]] == ["IMG0.JPG", "img1.jpg", "img2.jpeg"]
    assert groups["g"][1].mask.endswith("GroundTruth/img1.PNG")
    warned = [w.message for w in caught if isinstance(w.message, MissingMaskWarning)]
    assert warned[0].images == [str(tmp_path / "g" / f"lonely{i}.jpg") for i in range(7)]


def test_group_and_class_filters_name_what_was_asked_and_what_is_there(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    for g in ("cats", "cups"):
        _save(tmp_path / "ic" / g / "0.jpg", img)
        _save(tmp_path / "ic" / g / "GroundTruth" / "0.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"group 'nope' not found under .*ic \(groups requested: cats, nope\); "
                                         r"groups with ground-truth masks there: cats, cups"):
        read_icoseg(tmp_path / "ic", groups=["cats", "nope"])
    _voc(tmp_path / "voc", "000001", [("cat", 0, (1, 1, 10, 20)), ("dog", 1, (1, 1, 5, 5))])
    with pytest.raises(ValueError, match=r"class 'dog' not found .*\(classes requested: dog\); classes with objects "
                                         r"there \(difficult ones left out\): cat"):
        read_voc(tmp_path / "voc", classes=["dog"])


class _FixedResult:
    """A stand-in DFFResult whose concepts' masks are given: an oracle computed by hand."""

    def __init__(self, masks, mode="joint"):
        self._masks = masks                     # concept -> list of (H, W) bool, one per image
        self.n_concepts, self.n_images, self.mode = len(masks), len(masks[0]), mode
        self.image_sizes = [m.shape for m in masks[0]]
        self.concept_names, self.model_name, self.layer, self.untrained = ["a", "b"], "fixed", "x", False

    def masks(self, j, threshold=0.5):
        return self._masks[j]

    def boxes(self, j, threshold=0.5):
        from dffkit.deep_feature_factorization import mask_box

        return [mask_box(m) for m in self._masks[j]]


def test_evaluate_coseg_reads_voc_masks_and_leaves_void_out(tmp_path):
    top = np.zeros((10, 10), bool)
    top[:5] = True
    result = _FixedResult([[top], [~top]])
    idx = np.zeros((10, 10), np.uint8)
    idx[:4] = 8                                 # the object: rows 0..3
    idx[4] = 255                                # void: row 4
    p = Image.fromarray(idx, "P")
    p.putpalette(_voc_palette())
    p.save(tmp_path / "gt.png")
    report = evaluate_coseg([CosegSample("a.jpg", str(tmp_path / "gt.png"), "g")], result=result)
    # scored on the 90 pixels that are not void: prediction rows 0..3 = ground truth
    assert report["concept"] == 0 and report["jaccard"] == 1.0 and report["precision"] == 1.0
    assert report["per_concept_jaccard"] == [1.0, 0.0]


def _no_dff(monkeypatch):
    from dffkit import deep_feature_factorization

    monkeypatch.setattr(deep_feature_factorization, "dff", lambda *a, **k: pytest.fail("DFF ran before the checks"))


def test_evaluate_checks_the_ground_truth_frame_before_dff(tmp_path, monkeypatch):
    _no_dff(monkeypatch)
    _save(tmp_path / "img.jpg", np.zeros((40, 60, 3), np.uint8))            # 60 x 40
    _save(tmp_path / "tall.png", np.zeros((60, 40), np.uint8))              # 40 x 60: transposed
    with pytest.raises(ValueError, match=r"tall\.png is 40 x 60 .* but image .*img\.jpg is 60 x 40.*turned by 90"):
        evaluate_coseg([CosegSample(str(tmp_path / "img.jpg"), str(tmp_path / "tall.png"), "g")])
    with pytest.raises(ValueError, match=r"mask_threshold must be in \[0, 1\], got 2"):
        evaluate_coseg([CosegSample(str(tmp_path / "img.jpg"), str(tmp_path / "tall.png"), "g")], mask_threshold=2)
    with pytest.raises(ValueError, match=r"iou must be in \[0, 1\]"):
        evaluate_coloc([BoxSample(str(tmp_path / "img.jpg"), np.zeros((1, 4)))], iou=1.5)
    with pytest.raises(ValueError, match="choose must be"):
        evaluate_coseg([CosegSample(str(tmp_path / "img.jpg"), str(tmp_path / "tall.png"), "g")], choose="best")
    # VOC boxes in a frame of another aspect ratio: an error naming the annotation
    box = BoxSample(str(tmp_path / "img.jpg"), np.array([[0, 0, 30, 20]], float), ["x"], [False], (60, 60), "a.xml")
    with pytest.raises(ValueError, match=r"a\.xml: <size> is 60 x 60 .* but image .*img\.jpg is 60 x 40"):
        evaluate_coloc([box])


def test_evaluate_coloc_rescales_boxes_from_a_uniformly_scaled_frame(tmp_path):
    """The XML says 120 x 80 (twice the 60 x 40 image): its box (40, 20, 100, 60) is the image's
    (20, 10, 50, 30), which concept 0's mask covers exactly (CorLoc 1; 0 without rescaling)."""
    obj = _object()
    _save(tmp_path / "img.jpg", np.zeros((40, 60, 3), np.uint8))
    result = _FixedResult([[obj], [~obj]])
    box = BoxSample(str(tmp_path / "img.jpg"), np.array([[40, 20, 100, 60]], float), ["x"], [False], (80, 120),
                    "a.xml")
    with pytest.warns(GroundTruthWarning, match=r"a\.xml: <size> says 120 x 80 pixels but image .* is 60 x 40: "
                                                r"same aspect ratio, boxes rescaled"):
        report = evaluate_coloc([box], result=result)
    assert report["concept"] == 0 and report["corloc"] == 1.0


def test_image_size_follows_the_exif_orientation(tmp_path):
    from dffkit.evaluation import _image_size

    exif = Image.Exif()
    exif[0x0112] = 6                                                        # rotate 90 degrees
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "r.jpg", exif=exif)
    assert _image_size(tmp_path / "r.jpg") == (60, 40)


def _fake_coseg(samples, *a, **k):
    rows = [{"image": s.image, "concept": i % 2, "jaccard": 0.5, "precision": 0.5} for i, s in enumerate(samples)]
    return {"jaccard": 0.5, "precision": 0.5, "concept": None, "n_images": len(samples), "per_image": rows}


@needs_extractor
def test_cli_eval_reports_skipped_images_and_per_image_concepts(tmp_path, capsys, monkeypatch):
    from dffkit import evaluation

    monkeypatch.setattr(evaluation, "evaluate_coseg", _fake_coseg)
    root = _two_groups(tmp_path / "ds", sizes=(("big", 3),))
    _save(root / "big" / "stray.png", np.zeros((32, 32, 3), np.uint8))
    out = tmp_path / "ev.json"
    assert cli.main(["eval", str(root), "-k", "2", "--per-image", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "dffkit eval: warning: 1 image under" in captured.err and "big/stray.png" in captured.err
    assert "concept None" not in captured.out and "concepts per image: 0 in 2, 1 in 1" in captured.out
    report = json.loads(out.read_text())
    assert report["skipped_images"] == [str(root / "big" / "stray.png")] and len(report["warnings"]) == 1


def test_cli_eval_group_filter_and_threshold_fail_before_the_work(tmp_path, capsys, monkeypatch):
    from dffkit import deep_feature_factorization

    monkeypatch.setattr(deep_feature_factorization, "_build_extractor", lambda *a: pytest.fail("extractor built"))
    root = _two_groups(tmp_path / "ds")
    out = tmp_path / "new" / "ev.json"
    assert cli.main(["eval", str(root), "--group", "nope", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "group 'nope' not found" in err and "groups requested: nope" in err and "there: big, small" in err
    assert cli.main(["eval", str(root), "--threshold", "2", "--out", str(out)]) == 1
    assert "dffkit eval: error: --threshold must be a number in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
