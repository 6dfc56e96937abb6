"""Face detection with a rotation estimate, and face-centred rotate / resize / crop.

The detector is scikit-image's LBP frontal-face cascade, whose model file ships inside the
scikit-image wheel (nothing to download). A frontal cascade fires only on faces within about
±15° of upright, so the image is searched at a range of rotations: a real face is found at
several neighbouring rotations at the same place, while false detections rarely repeat. That
coarse rotation is then refined by mirror symmetry: the rotation at which the face patch best
matches its own mirror image is the one that levels the eyes (within a few degrees).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from library.errors import UserError

logger = logging.getLogger(__name__)

WORK_SIZE = 200          # longest side the search runs at (faces of ~10% of the image and up)
ANGLE_RANGE = 48         # degrees searched either way (faces tilted up to about 50 degrees)
ANGLE_STEP = 12
MIN_HITS = 3             # rotations a face must be found at
MIN_NEIGHBORS = 4        # overlapping cascade windows one detection needs
SYMMETRY_SPAN = 16       # degrees either side of the coarse angle searched for symmetry
SYMMETRY_STEP = 2
PATCH = 48               # side of the patch compared with its mirror


@dataclass
class Face:
    """A face in image pixels: centre, size, and the rotation (degrees, counter-clockwise as
    in OpenCV) that makes it upright."""

    cx: float
    cy: float
    width: float
    height: float
    angle: float
    hits: int = 1

    @property
    def size(self) -> float:
        return max(self.width, self.height)


def _cascade():
    from skimage import data
    from skimage.feature import Cascade

    return Cascade(data.lbp_frontal_face_cascade_filename())


def _cluster(detections: list[Face]) -> list[Face]:
    """Group detections of the same face (close centres, similar sizes) found at different angles."""
    groups: list[list[Face]] = []
    for det in sorted(detections, key=lambda d: -d.size):
        for group in groups:
            ref = group[0]
            close = math.hypot(det.cx - ref.cx, det.cy - ref.cy) < 0.5 * max(ref.size, det.size)
            if close and 0.6 < det.size / ref.size < 1.67 and all(d.angle != det.angle for d in group):
                group.append(det)
                break
        else:
            groups.append([det])
    faces = []
    for group in groups:
        n = len(group)
        faces.append(Face(
            cx=sum(d.cx for d in group) / n, cy=sum(d.cy for d in group) / n,
            width=sum(d.width for d in group) / n, height=sum(d.height for d in group) / n,
            angle=sum(d.angle for d in group) / n, hits=n,
        ))
    return faces


def detect_faces(image: np.ndarray, work_size: int = WORK_SIZE, angle_range: int = ANGLE_RANGE,
                 angle_step: int = ANGLE_STEP, min_hits: int = MIN_HITS, min_neighbors: int = MIN_NEIGHBORS) -> list[Face]:
    """Faces of an RGB uint8 image, most certain first (found at the most rotations, then larger)."""
    height, width = image.shape[:2]
    scale = min(1.0, work_size / max(height, width))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    gh, gw = gray.shape
    centre = (gw / 2, gh / 2)
    cascade = _cascade()
    detections = []
    for angle in range(-angle_range, angle_range + 1, angle_step):
        matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
        rotated = cv2.warpAffine(gray, matrix, (gw, gh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        found = cascade.detect_multi_scale(img=rotated.astype(np.float32) / 255.0, scale_factor=1.1, step_ratio=1,
                                           min_size=(16, 16), max_size=(gw, gh), min_neighbor_number=min_neighbors)
        inverse = cv2.invertAffineTransform(matrix)
        for det in found:
            x, y = det["c"] + det["width"] / 2, det["r"] + det["height"] / 2
            ox, oy = inverse @ np.array([x, y, 1.0])
            detections.append(Face(ox / scale, oy / scale, det["width"] / scale, det["height"] / scale, float(angle)))
    faces = [f for f in _cluster(detections) if f.hits >= min_hits]
    full_gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    for face in faces:
        face.angle = symmetric_angle(full_gray, face)
    return sorted(faces, key=lambda f: (-f.hits, -f.size))


def symmetric_angle(gray: np.ndarray, face: Face, span: float = SYMMETRY_SPAN, step: float = SYMMETRY_STEP) -> float:
    """The rotation near `face.angle` at which the face patch is most like its mirror image.

    The symmetry axis may sit a little off the detected centre, so small sideways shifts of
    the patch are tried as well; the score is the normalised correlation with the mirror."""
    scale = PATCH / (0.8 * face.size)  # the inner 80% of the box: the face, little background
    best_score, best_angle = -np.inf, face.angle
    for angle in np.arange(face.angle - span, face.angle + span + step / 2, step):
        for shift in (-0.08, -0.04, 0.0, 0.04, 0.08):
            matrix = cv2.getRotationMatrix2D((face.cx, face.cy), float(angle), scale)
            matrix[0, 2] += PATCH / 2 - face.cx - shift * PATCH
            matrix[1, 2] += PATCH / 2 - face.cy
            patch = cv2.warpAffine(gray, matrix, (PATCH, PATCH), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
            patch = (patch - patch.mean()) / (patch.std() + 1e-6)
            score = float((patch * patch[:, ::-1]).mean())
            if score > best_score:
                best_score, best_angle = score, float(angle)
    return best_angle


# ---------------------------------------------------------------------------------------
# rotate / resize / crop

def rotate_about(image: np.ndarray, angle: float, cx: float, cy: float) -> np.ndarray:
    """Rotate by `angle` degrees about the face centre (which stays where it is); borders mirrored."""
    matrix = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    return cv2.warpAffine(image, matrix, (image.shape[1], image.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def parse_pair(value: Optional[str], flag: str, kind: type) -> Optional[tuple]:
    if value is None:
        return None
    parts = value.split(",")
    try:
        pair = tuple(kind(p) for p in parts)
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) <= 0:
        raise UserError(f"{flag}: expected two positive numbers 'width,height', got {value!r}")
    return pair


@dataclass
class CropSettings:
    crop_size: Optional[tuple[int, int]] = None       # pixels
    crop_ratio: Optional[tuple[float, float]] = None  # multiples of the face size
    resize_fit: bool = False
    resize_face_size: Optional[int] = None

    def check(self) -> None:
        if self.resize_fit and self.resize_face_size is not None:
            raise UserError("--resize_fit and --resize_face_size cannot be used together")
        if self.crop_ratio is not None and self.resize_face_size is not None:
            raise UserError("--crop_ratio and --resize_face_size cannot be used together")


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    shrink = size[0] < image.shape[1]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)


def crop_around_face(image: np.ndarray, face: Face, settings: CropSettings, name: str = "") -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(image, (cx, cy, fw, fh) in that image) after the optional resize and face-centred crop."""
    cx, cy, fw, fh = face.cx, face.cy, face.width, face.height
    if settings.crop_size is None and settings.crop_ratio is None:
        return image, (int(cx), int(cy), int(fw), int(fh))
    height, width = image.shape[:2]
    if settings.crop_ratio is not None:
        crop_w = int(face.size * settings.crop_ratio[0] + 0.5)
        crop_h = int(face.size * settings.crop_ratio[1] + 0.5)
    else:
        crop_w, crop_h = settings.crop_size
    scale = 1.0
    if settings.resize_face_size is not None:
        scale = settings.resize_face_size / face.size
        # never so small that the crop would not fit
        if scale < max(crop_w / width, crop_h / height):
            logger.warning("%s: the face is too large for --resize_face_size with this crop; scaled to fit the crop", name)
            scale = max(crop_w / width, crop_h / height)
    elif settings.crop_ratio is None:
        if width < crop_w or height < crop_h:
            logger.warning("%s: image smaller than --crop_size; upscaled", name)
            scale = max(crop_w / width, crop_h / height)
        if settings.resize_fit:
            scale = max(crop_w / width, crop_h / height)
    if scale != 1.0:
        image = _resize(image, (int(width * scale + 0.5), int(height * scale + 0.5)))
        cx, cy, fw, fh = cx * scale, cy * scale, fw * scale, fh * scale
        height, width = image.shape[:2]
    crop_w, crop_h = min(crop_w, width), min(crop_h, height)
    left = int(min(max(cx - crop_w // 2, 0), width - crop_w))
    top = int(min(max(cy - crop_h // 2, 0), height - crop_h))
    image = image[top : top + crop_h, left : left + crop_w]
    return image, (int(cx - left + 0.5), int(cy - top + 0.5), int(fw + 0.5), int(fh + 0.5))


def draw_face_box(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    cx, cy, fw, fh = box
    image = np.ascontiguousarray(image).copy()
    cv2.rectangle(image, (cx - fw // 2, cy - fh // 2), (cx + fw // 2, cy + fh // 2), (255, 0, 255), max(1, fw // 20))
    return image


def face_file_stem(stem: str, index: Optional[int], box: tuple[int, int, int, int]) -> str:
    """`<stem>[_NN]_cx_cy_fw_fh`: the face position that training's --face_crop_aug_range reads back."""
    suffix = f"_{index:02d}" if index is not None else ""
    cx, cy, fw, fh = box
    return f"{stem}{suffix}_{cx:04d}_{cy:04d}_{fw:04d}_{fh:04d}"
