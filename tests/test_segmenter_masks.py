"""Masks as the usual segmenters write them (protloc/cells.py): Cellpose's `_cp_masks.tif|png` and
`_seg.npy`, StarDist's `.stardist.tif`, found beside the images or in a folder."""

import imagecodecs
import numpy as np
import pytest
import tifffile

from protloc.cells import find_mask, image_sources, read_mask
from protloc.embeddings import read_embeddings
from protloc.errors import ProtlocError
from protloc.sources import discover
from test_cli import RANDOM, one_error_line, run


def labels(shape=(48, 48)):
    """Two square cells (labels 3 and 7) well inside the image, uint16 as Cellpose and StarDist store them."""
    mask = np.zeros(shape, np.uint16)
    mask[8:20, 10:22] = 3
    mask[26:40, 24:38] = 7
    return mask


def write_image(path, shape=(2, 48, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.random.default_rng(0).integers(1, 4000, shape, dtype=np.uint16))


# how each tool writes its mask of image X (stem "X") into `folder`
def cellpose_png(folder, stem, mask):  # cellpose.io.save_masks(..., png=True): imageio/cv2 16-bit PNG
    (folder / f"{stem}_cp_masks.png").write_bytes(imagecodecs.png_encode(mask))


def cellpose_tif(folder, stem, mask):  # cellpose.io.save_masks(..., tif=True)
    tifffile.imwrite(folder / f"{stem}_cp_masks.tif", mask)


def cellpose_seg(folder, stem, mask):  # cellpose.io.masks_flows_to_seg: np.save of a dict (a pickle)
    np.save(folder / f"{stem}_seg.npy", {"masks": mask, "outlines": np.zeros_like(mask), "filename": f"{stem}.tif",
                                        "chan_choose": [0, 0], "ismanual": np.zeros(2, bool), "est_diam": 30.0})


def stardist_tif(folder, stem, mask):  # stardist-predict2d: imwrite(outdir / '{img}.stardist.tif', compress=3)
    tifffile.imwrite(folder / f"{stem}.stardist.tif", mask, compression="zlib")


WRITERS = [cellpose_png, cellpose_tif, cellpose_seg, stardist_tif]


@pytest.mark.parametrize("write", WRITERS, ids=lambda w: w.__name__)
def test_each_segmenters_mask_is_found_beside_the_image_and_in_a_folder(tmp_path, write):
    write_image(tmp_path / "fields" / "X.tif")
    write(tmp_path / "fields", "X", labels())
    (tmp_path / "masks").mkdir()
    write(tmp_path / "masks", "X", labels())
    image = str(tmp_path / "fields" / "X.tif")
    for spec, folder in (("{dir}", "fields"), (str(tmp_path / "masks"), "masks")):
        path = find_mask(image, spec)
        assert path.startswith(str(tmp_path / folder))
        np.testing.assert_array_equal(read_mask(path, (48, 48), image, 10**6), labels())
    # masks beside the images are not images themselves
    assert [s.id for s in image_sources(discover([str(tmp_path / "fields")]), "{dir}")] == [image]


def test_embed_cells_from_cellpose_masks_beside_the_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k, write in enumerate([cellpose_png, cellpose_seg, stardist_tif]):
        write_image(tmp_path / "fields" / f"f{k}.tif")
        write(tmp_path / "fields", f"f{k}", labels())
    result = run(["embed", "fields", *RANDOM, "--depth", "1", "--cells", "{dir}", "--cell-size", "16", "-o", "c.npz"])
    assert result.exit_code == 0, result.output
    assert read_embeddings("c.npz").ids == [f"fields/f{k}.tif#cell={c}" for k in range(3) for c in (3, 7)]
    # masks in a folder below each image's
    (tmp_path / "fields" / "seg").mkdir()
    cellpose_tif(tmp_path / "fields" / "seg", "f0", labels())
    result = run(["embed", "fields/f0.tif", *RANDOM, "--depth", "1", "--cells", "{dir}/seg", "--cell-size", "16",
                  "-o", "seg.npz"])
    assert result.exit_code == 0, result.output
    assert read_embeddings("seg.npz").ids == ["fields/f0.tif#cell=3", "fields/f0.tif#cell=7"]


def test_two_masks_of_one_image_are_ambiguous(tmp_path):
    write_image(tmp_path / "X.tif")
    cellpose_png(tmp_path, "X", labels())
    cellpose_seg(tmp_path, "X", labels())
    with pytest.raises(ProtlocError, match=r"X.tif: several masks match: .*X_cp_masks.png, .*X_seg.npy"):
        find_mask(str(tmp_path / "X.tif"), "{dir}")


def test_bad_segmenter_files_are_one_line_naming_them(tmp_path):
    seg = tmp_path / "X_seg.npy"
    np.save(seg, labels())  # an array, not Cellpose's dict
    with pytest.raises(ProtlocError, match=r"X_seg.npy: a Cellpose _seg.npy file holds a dict with 'masks'"):
        read_mask(str(seg), (48, 48), "X.tif", 10**6)
    np.save(seg, {"outlines": labels()})
    with pytest.raises(ProtlocError, match=r"X_seg.npy: a Cellpose _seg.npy file holds a dict with 'masks'"):
        read_mask(str(seg), (48, 48), "X.tif", 10**6)
    np.save(seg, {"masks": np.stack([labels(), labels()])})  # a 3-D segmentation
    with pytest.raises(ProtlocError, match=r"X_seg.npy: a mask must be one 2-D label image, got shape \(2, 48, 48\)"):
        read_mask(str(seg), (48, 48), "X.tif", 10**6)
    seg.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ProtlocError, match=r"X_seg.npy: not a readable Cellpose _seg.npy file"):
        read_mask(str(seg), (48, 48), "X.tif", 10**6)
    png = tmp_path / "X_cp_masks.png"
    cellpose_png(tmp_path, "X", labels())
    with pytest.raises(ProtlocError, match=r"X_cp_masks.png: mask of 48x48 pixels is larger than --max-pixels"):
        read_mask(str(png), (48, 48), "X.tif", 1000)
    png.write_bytes(png.read_bytes()[:60])  # cut short
    with pytest.raises(ProtlocError, match=r"X_cp_masks.png: not a readable PNG mask"):
        read_mask(str(png), (48, 48), "X.tif", 10**6)
    png.write_bytes(b"not a png at all, but long enough")
    with pytest.raises(ProtlocError, match=r"X_cp_masks.png: not a PNG file"):
        read_mask(str(png), (48, 48), "X.tif", 10**6)


def test_only_cellposes_seg_file_is_unpickled(tmp_path):
    """A pickle under another name (a pattern naming `{stem}.npy`) is never loaded with allow_pickle."""
    np.save(tmp_path / "X.npy", {"masks": labels()})
    path = find_mask(str(tmp_path / "X.tif"), str(tmp_path / "{stem}.npy"))
    with pytest.raises(ProtlocError, match=r"X.npy: not a readable TIFF mask"):
        read_mask(path, (48, 48), "X.tif", 10**6)


def test_a_missing_mask_names_every_name_looked_for(tmp_path):
    write_image(tmp_path / "fields" / "X.tif")
    result = run(["embed", tmp_path / "fields", *RANDOM, "--cells", "{dir}", "-o", tmp_path / "c.npz"])
    one_error_line(result, "X.tif: no mask", "X{.tif,.tiff,_mask.tif", "_cp_masks.png,_seg.npy}")
    assert not (tmp_path / "c.npz").exists()
