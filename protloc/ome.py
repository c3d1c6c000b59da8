"""OME-TIFF metadata: what a file's OME-XML declares about its images, channels and files.

An OME-TIFF keeps OME-XML in the ImageDescription of its first page. Each Image's Pixels
declare SizeZ x SizeC x SizeT planes and name their channels; TiffData elements say which IFD of
which file holds each plane. A multi-file OME-TIFF spreads one image over several files: the
master holds the XML, whose TiffData name their file by `UUID FileName`; a companion holds
`<BinaryOnly MetadataFile="master"/>` only, or (some writers) the full XML again.

tifffile reads the planes; this module answers what the XML says, for the reader (channel
names, declared sizes, missing companions) and for discovery (which files a master covers).

Reference: the OME-TIFF specification, https://ome-model.readthedocs.io/en/stable/ome-tiff/
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from xml.etree import ElementTree

import tifffile

from protloc.tiff_messages import TiffMessages

log = logging.getLogger(__name__)

OME_SUFFIXES = (".ome.tif", ".ome.tiff")  # case-insensitive


def _children(element, name: str) -> list:
    """Direct children called `name`, whatever the OME namespace (2008 to 2016 schemas)."""
    return [e for e in element if e.tag.rsplit("}", 1)[-1] == name]


@dataclass(frozen=True)
class OmeXml:
    root: ElementTree.Element
    folder: str  # the directory of the file the XML came from: FileNames are relative to it

    @classmethod
    def of(cls, description: str | None, path: str) -> OmeXml | None:
        """The parsed OME-XML of a file's first ImageDescription; None if it holds none."""
        if not description or "<OME" not in description:
            return None
        try:
            root = ElementTree.fromstring(description)
        except ElementTree.ParseError as e:
            log.debug("%s: OME-XML does not parse: %s", path, e)
            return None
        return cls(root, os.path.dirname(path))

    def master(self) -> str | None:
        """For a BinaryOnly companion: the path of the master file that holds its metadata."""
        for binary in _children(self.root, "BinaryOnly"):
            name = binary.attrib.get("MetadataFile")
            if name:
                return os.path.normpath(os.path.join(self.folder, name))
        return None

    def files(self) -> list[str]:
        """Paths of the files the TiffData elements name (this file included), in order."""
        names: dict[str, None] = {}
        for image in _children(self.root, "Image"):
            for pixels in _children(image, "Pixels"):
                for data in _children(pixels, "TiffData"):
                    for uuid in _children(data, "UUID"):
                        if uuid.attrib.get("FileName"):
                            names.setdefault(os.path.normpath(os.path.join(self.folder, uuid.attrib["FileName"])))
        return list(names)

    def _pixels(self, image: int):
        images = _children(self.root, "Image")
        if not 0 <= image < len(images):
            return None
        pixels = _children(images[image], "Pixels")
        return pixels[0] if pixels else None

    def sizes(self, image: int) -> str | None:
        """What the Pixels of Image `image` declare, e.g. 'SizeZ x SizeC x SizeT = 4 x 2 x 1'."""
        pixels = self._pixels(image)
        if pixels is None:
            return None
        return "SizeZ x SizeC x SizeT = " + " x ".join(pixels.attrib.get(f"Size{a}", "1") for a in "ZCT")

    def channel_names(self, image: int, n_channels: int) -> list[str] | None:
        """Channel Names of Image `image`, raw as stored; None unless there is one per channel."""
        pixels = self._pixels(image)
        if pixels is None:
            return None
        names = [c.attrib.get("Name") for c in _children(pixels, "Channel")]
        if len(names) != n_channels or any(n is None for n in names):
            return None
        return [str(n) for n in names]


def read_ome_xml(path: str) -> OmeXml | None:
    """The OME-XML of an `.ome.tif(f)` file from its first IFD only (cheap: discovery calls it for
    every such input); None for other files and for files that do not open (the reader says why)."""
    if not path.lower().endswith(OME_SUFFIXES):
        return None
    try:
        with TiffMessages(path).capture(), tifffile.TiffFile(path) as tif:
            return OmeXml.of(tif.pages.first.description, path)
    except Exception as e:  # noqa: BLE001 - a damaged file stays an input; reading it names the problem
        log.debug("%s: no OME-XML read: %s", path, e)
        return None
