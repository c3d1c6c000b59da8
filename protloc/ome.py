"""OME-TIFF metadata: what a file's OME-XML declares about its images, channels and files.

An OME-TIFF keeps OME-XML in the ImageDescription of its first page. Each Image's Pixels
declare SizeZ x SizeC x SizeT planes and name their channels; TiffData elements say which IFD of
which file holds each plane. A multi-file OME-TIFF spreads one image over several files: the
master holds the XML, whose TiffData name their file by `UUID FileName`; a companion holds
`<BinaryOnly MetadataFile="master"/>` only, or (some writers) the full XML again.

Files are found the way tifffile finds them: a TiffData's UUID names its file, the XML's own UUID
its own file whatever FileName says (files get renamed). A set may hold one image spread over
several files (one file per channel, z or time point) or several images, one per file (Micro-
Manager's stage positions, a plate's wells): the files that share an image are each other's
`partners`; a file without partners is an image of its own.

tifffile reads the planes; this module answers what the XML says, for the reader (channel
names, declared sizes, missing files, UUIDs that do not name one file each) and for discovery
(which files are read through another).

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


def _children(element, name: str) -> list:
    """Direct children called `name`, whatever the OME namespace (2008 to 2016 schemas)."""
    return [e for e in element if e.tag.rsplit("}", 1)[-1] == name]


@dataclass(frozen=True)
class OmeXml:
    root: ElementTree.Element
    path: str  # the file the XML came from: FileNames are relative to its folder

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
        return cls(root, path)

    def _named(self, name: str) -> str:
        return os.path.normpath(os.path.join(os.path.dirname(self.path), name))

    def master(self) -> str | None:
        """For a BinaryOnly file: the path of the file that holds its metadata."""
        for binary in _children(self.root, "BinaryOnly"):
            name = binary.attrib.get("MetadataFile")
            if name:
                return self._named(name)
        return None

    def _tiffdata(self):
        """(Image index, TiffData element) of every TiffData, in order."""
        for i, image in enumerate(_children(self.root, "Image")):
            for pixels in _children(image, "Pixels"):
                for data in _children(pixels, "TiffData"):
                    yield i, data

    def _file(self, data) -> str:
        """The file a TiffData's planes lie in, as tifffile finds it: by the UUID (this XML's own
        UUID, or none on either side, is this file), else by FileName."""
        for uuid in _children(data, "UUID"):
            text, name = (uuid.text or "").strip() or None, uuid.attrib.get("FileName")
            own = self.root.attrib.get("UUID")
            if text == own or not name or (own is None and name.lower() == os.path.basename(self.path).lower()):
                return self.path
            return self._named(name)
        return self.path

    def image_files(self) -> list[list[str]]:
        """For each Image, the files its planes lie in (this one as `path`), in order."""
        files: list[dict[str, None]] = [{} for _ in _children(self.root, "Image")]
        for i, data in self._tiffdata():
            files[i].setdefault(self._file(data))
        return [list(f) for f in files]

    def files(self) -> list[str]:
        """The other files the XML puts planes in, in order."""
        return list(dict.fromkeys(f for fs in self.image_files() for f in fs if f != self.path))

    def partners(self, path: str) -> list[str]:
        """The other files that hold planes of an image with planes in `path` (same file = same real path)."""
        me = os.path.realpath(path)
        found: dict[str, None] = {}
        for fs in self.image_files():
            if me in map(os.path.realpath, fs):
                found.update((f, None) for f in fs if os.path.realpath(f) != me)
        return list(found)

    def missing_elsewhere(self, path: str) -> list[str]:
        """The FileNames, as written, of missing files that hold none of `path`'s images (other
        images of a set whose files are images of their own)."""
        mine = {os.path.realpath(f) for f in (path, *self.partners(path))}
        names: dict[str, None] = {}
        for _, data in self._tiffdata():
            f = self._file(data)
            if os.path.realpath(f) not in mine and not os.path.exists(f):
                names.setdefault(_children(data, "UUID")[0].attrib["FileName"])
        return list(names)

    def shared_uuid(self) -> tuple[str, list[str]] | None:
        """A UUID the TiffData give to more than one FileName, and those names; None if each names one
        file (tifffile would read the planes of all of them from the first)."""
        names: dict[str | None, dict[str, None]] = {}
        for _, data in self._tiffdata():
            for uuid in _children(data, "UUID")[:1]:
                names.setdefault((uuid.text or "").strip() or None, {})[uuid.attrib.get("FileName", "")] = None
        return next(((text or "(none)", list(n)) for text, n in names.items() if len(n) > 1), None)

    def image(self, series: int) -> int | None:
        """The Image that tifffile's OME series `series` reads (tifffile leaves out Images without TiffData)."""
        with_data = sorted({i for i, _ in self._tiffdata()})
        return with_data[series] if 0 <= series < len(with_data) else None

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
    """The OME-XML of a file from its first IFD only (cheap: discovery calls it for every OME-TIFF
    input); None for files without one and for files that do not open (the reader says why)."""
    try:
        with TiffMessages(path).capture(), tifffile.TiffFile(path) as tif:
            return OmeXml.of(tif.pages.first.description, path)
    except Exception as e:  # noqa: BLE001 - a damaged file stays an input; reading it names the problem
        log.debug("%s: no OME-XML read: %s", path, e)
        return None
