"""A small, exact perspective renderer of textured planar quads (NumPy and OpenCV only).

The built-in landmark collection (`model.datasets.landmarks`, whose package holds it) draws
its scenes with it. Every quad is a plane, so its texture-to-image map is an exact homography and
its inverse depth is an affine function of the pixel coordinates; both are evaluated per pixel,
which makes the coverage, the depth buffer and the texture mapping agree with `Camera.project`
to floating-point precision.

Conventions (OpenCV): a world point X maps to camera coordinates x = R @ X + t with x to the
right, y down and z forward, and to the pixel K @ x / z. The centre of the top-left pixel is
(0, 0); add 0.5 to get COLMAP's convention, where the top-left pixel's corner is (0, 0).
Images are RGB.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

_MIN_MIP_SIZE = 4


def intrinsics(focal: float, width: int, height: int) -> np.ndarray:
    """Pinhole intrinsics with square pixels and the principal point at the image centre."""
    if focal <= 0:
        raise ValueError(f"focal must be positive, got {focal}")
    return np.array(
        [[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0], [0.0, 0.0, 1.0]]
    )


def _frozen_array(
    value: np.ndarray | Sequence[float], shape: tuple[int, ...], name: str
) -> np.ndarray:
    array = np.array(value, dtype=np.float64)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class Camera:
    """A pinhole camera: intrinsics K, world-to-camera rotation R and translation t, image size."""

    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    width: int
    height: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "K", _frozen_array(self.K, (3, 3), "K"))
        object.__setattr__(self, "R", _frozen_array(self.R, (3, 3), "R"))
        object.__setattr__(self, "t", _frozen_array(self.t, (3,), "t"))
        if not np.allclose(self.R @ self.R.T, np.eye(3), atol=1e-6) or np.linalg.det(self.R) < 0:
            raise ValueError("R must be a rotation matrix (orthonormal, determinant +1)")
        if self.width < 1 or self.height < 1:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")

    @property
    def centre(self) -> np.ndarray:
        """The optical centre in world coordinates."""
        return -self.R.T @ self.t

    @property
    def forward(self) -> np.ndarray:
        """The unit viewing direction (optical axis) in world coordinates."""
        return self.R[2].copy()

    def to_camera(self, points_world: np.ndarray) -> np.ndarray:
        """World points [N, 3] in camera coordinates [N, 3]."""
        points = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
        return points @ self.R.T + self.t

    def project(self, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates [N, 2] and depths z [N] of world points [N, 3].

        Points behind the camera get a negative depth; their pixel coordinates mean nothing.
        """
        cam = self.to_camera(points_world)
        depth = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = (cam @ self.K.T)[:, :2] / depth[:, None]
        return uv, depth

    def pixel_rays(self) -> np.ndarray:
        """Unit world directions [H, W, 3] of the rays through the pixel centres."""
        xs, ys = np.meshgrid(np.arange(self.width), np.arange(self.height))
        pixels = np.stack([xs, ys, np.ones_like(xs)], axis=-1).astype(np.float64)
        rays = pixels @ np.linalg.inv(self.K).T @ self.R
        return rays / np.linalg.norm(rays, axis=-1, keepdims=True)

    def scaled(self, factor: int) -> Camera:
        """The same camera on a grid `factor` times finer, pixel centres kept consistent.

        An output pixel covers `factor` x `factor` fine pixels, so area downsampling of the
        fine image gives exactly this camera's image.
        """
        offset = (factor - 1) / 2.0
        scale = np.array([[factor, 0.0, offset], [0.0, factor, offset], [0.0, 0.0, 1.0]])
        return Camera(scale @ self.K, self.R, self.t, self.width * factor, self.height * factor)


def _unit(vector: np.ndarray, name: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if norm < 1e-12:
        raise ValueError(f"{name} has zero length")
    return vector / norm


def look_at(
    eye: Sequence[float] | np.ndarray,
    target: Sequence[float] | np.ndarray,
    up: Sequence[float] | np.ndarray,
    *,
    K: np.ndarray,
    size: tuple[int, int],
    roll: float = 0.0,
) -> Camera:
    """A camera at `eye` looking at `target`, `up` pointing up in the image, rolled by `roll`
    radians about the optical axis (positive turns the image clockwise); size is (width, height).
    """
    eye_ = np.asarray(eye, dtype=np.float64)
    forward = _unit(np.asarray(target, dtype=np.float64) - eye_, "target - eye")
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(right) < 1e-9:
        raise ValueError("up is parallel to the viewing direction; pick another up vector")
    right = _unit(right, "right")
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])
    if roll:
        c, s = np.cos(roll), np.sin(roll)
        R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ R
    return Camera(K, R, -R @ eye_, int(size[0]), int(size[1]))


@dataclass(frozen=True, eq=False)
class TexturedQuad:
    """The parallelogram origin + s * u_axis + t * v_axis, s and t in [0, 1], with an RGB texture.

    Texture column s * width and row t * height lie at (s, t): the texture reads unmirrored from
    the side `normal` points to. A single-sided quad is invisible from the other side (the faces
    of a closed box), which saves drawing faces the depth buffer would hide anyway.
    """

    origin: np.ndarray
    u_axis: np.ndarray
    v_axis: np.ndarray
    texture: np.ndarray
    double_sided: bool = True

    def __post_init__(self) -> None:
        for name in ("origin", "u_axis", "v_axis"):
            object.__setattr__(self, name, _frozen_array(getattr(self, name), (3,), name))
        texture = np.asarray(self.texture)
        if texture.dtype != np.uint8 or texture.ndim != 3 or texture.shape[2] != 3:
            raise ValueError(
                f"texture must be an HxWx3 uint8 image, got {texture.dtype} {texture.shape}"
            )
        if np.linalg.norm(np.cross(self.u_axis, self.v_axis)) < 1e-12:
            raise ValueError("u_axis and v_axis must span a plane (they are parallel or zero)")

    @property
    def corners(self) -> np.ndarray:
        """The corners [4, 3] at (s, t) = (0, 0), (1, 0), (1, 1), (0, 1)."""
        o, u, v = self.origin, self.u_axis, self.v_axis
        return np.stack([o, o + u, o + u + v, o + v])

    @property
    def normal(self) -> np.ndarray:
        """The unit normal on the side from which the texture reads unmirrored."""
        n = np.cross(self.v_axis, self.u_axis)
        return n / np.linalg.norm(n)

    @property
    def area(self) -> float:
        return float(np.linalg.norm(np.cross(self.u_axis, self.v_axis)))

    def point(self, s: np.ndarray, t: np.ndarray) -> np.ndarray:
        """World points [N, 3] at texture coordinates (s, t) in [0, 1]."""
        s_ = np.asarray(s, dtype=np.float64).reshape(-1, 1)
        t_ = np.asarray(t, dtype=np.float64).reshape(-1, 1)
        return self.origin + s_ * self.u_axis + t_ * self.v_axis

    @functools.cached_property
    def mipmaps(self) -> tuple[np.ndarray, ...]:
        """The texture at halving resolutions, so distant quads do not alias."""
        levels = [np.ascontiguousarray(self.texture)]
        while min(levels[-1].shape[:2]) >= 2 * _MIN_MIP_SIZE:
            h, w = levels[-1].shape[:2]
            levels.append(
                cv2.resize(levels[-1], ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)
            )
        return tuple(levels)


def sky(
    camera: Camera,
    zenith: Sequence[float],
    horizon: Sequence[float],
    *,
    up: Sequence[float] = (0.0, 0.0, 1.0),
) -> np.ndarray:
    """A sky background [H, W, 3] float32: `horizon` colour at and below the horizon, blending to
    `zenith` with the ray's elevation, so the horizon sits where the camera geometry puts it."""
    elevation = np.clip(camera.pixel_rays() @ _unit(np.asarray(up, dtype=np.float64), "up"), 0, 1)
    weight = np.sqrt(elevation)[..., None]
    zenith_ = np.asarray(zenith, dtype=np.float64)
    horizon_ = np.asarray(horizon, dtype=np.float64)
    return (horizon_ + weight * (zenith_ - horizon_)).astype(np.float32)


def _clip_near(points: np.ndarray, near: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a convex polygon [N, 3] in camera coordinates to z >= near."""
    kept: list[np.ndarray] = []
    for a, b in zip(points, np.roll(points, -1, axis=0), strict=True):
        da, db = a[2] - near, b[2] - near
        if da >= 0:
            kept.append(a)
        if da * db < 0:
            kept.append(a + (b - a) * (da / (da - db)))
    return np.array(kept).reshape(-1, 3)


def _pixel_box(uv: np.ndarray, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Integer box (x0, y0, x1, y1), end exclusive, around points, clipped to the image."""
    x0 = max(int(np.floor(uv[:, 0].min())), 0)
    y0 = max(int(np.floor(uv[:, 1].min())), 0)
    x1 = min(int(np.ceil(uv[:, 0].max())) + 1, width)
    y1 = min(int(np.ceil(uv[:, 1].max())) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1


def _mip_level(plane: np.ndarray, vertices: np.ndarray, quad: TexturedQuad) -> int:
    """The mipmap level whose texels are about one pixel at the quad's nearest visible vertex.

    `plane` maps (s, t, 1) to homogeneous pixels and `vertices` [N, 3] are homogeneous pixels of
    the clipped quad; the Jacobian's determinant of the map is the image area of the unit square
    of texture, which spans width x height texels at level 0.
    """
    h, w = quad.texture.shape[:2]
    texels_per_pixel = np.inf
    for p in vertices:
        jac = (plane[:2, :2] - np.outer(p[:2] / p[2], plane[2, :2])) / p[2]
        area = abs(np.linalg.det(jac))
        if area > 0:
            texels_per_pixel = min(texels_per_pixel, np.sqrt(w * h / area))
    if not np.isfinite(texels_per_pixel) or texels_per_pixel <= 1:
        return 0
    return min(int(np.log2(texels_per_pixel)), len(quad.mipmaps) - 1)


def _plane_to_image(quad: TexturedQuad, camera: Camera) -> np.ndarray:
    """The homography from the quad's (s, t, 1) to z * (x, y, 1): pixel and depth at once."""
    R, t = camera.R, camera.t
    return camera.K @ np.column_stack([R @ quad.u_axis, R @ quad.v_axis, R @ quad.origin + t])


def _coverage(
    to_plane: np.ndarray, box: tuple[int, int, int, int], inv_depth: np.ndarray, *, near: float
) -> tuple[np.ndarray, np.ndarray]:
    """(mask, 1 / z) over the box: pixels whose centre sees the quad in front of `near` and
    nearer than what `inv_depth` holds.

    `to_plane` maps (x, y, 1) to (s, t, 1) / z, so its rows are affine in the pixel coordinates;
    the quad covers a pixel when 0 <= s, t <= 1 and 1 / z > 0, tested without dividing.
    """
    x0, y0, x1, y1 = box
    xs = np.arange(x0, x1, dtype=np.float64)
    ys = np.arange(y0, y1, dtype=np.float64)
    s_z, t_z, inv_z = (
        (a * xs).astype(np.float32)[None, :] + (b * ys + c).astype(np.float32)[:, None]
        for a, b, c in to_plane
    )
    mask = (inv_z > inv_depth[y0:y1, x0:x1]) & (inv_z < 1.0 / near)
    mask &= (s_z >= 0) & (s_z <= inv_z) & (t_z >= 0) & (t_z <= inv_z)
    return mask, inv_z


def _warp_texture(
    texture: np.ndarray, to_plane: np.ndarray, box: tuple[int, int, int, int]
) -> np.ndarray:
    """The texture as seen in the box, float32, sampled bilinearly at each pixel centre."""
    x0, y0, x1, y1 = box
    th, tw = texture.shape[:2]
    to_texel = np.array([[tw, 0.0, -0.5], [0.0, th, -0.5], [0.0, 0.0, 1.0]])  # texel centres
    from_box = np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
    return cv2.warpPerspective(
        texture,
        to_texel @ to_plane @ from_box,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    ).astype(np.float32)


def _draw_quad(
    quad: TexturedQuad,
    camera: Camera,
    gain: float,
    *,
    near: float,
    colour: np.ndarray,
    inv_depth: np.ndarray,
) -> None:
    """Draw one quad into the colour and inverse-depth buffers where it is the nearest surface."""
    to_quad = camera.centre - quad.origin
    facing = float(np.dot(quad.normal, to_quad))
    if abs(facing) < 1e-9 * (1 + np.linalg.norm(to_quad)):
        return  # seen edge-on: no area
    if not quad.double_sided and facing < 0:
        return  # back face
    # Clipping at the near plane bounds the part in front; projecting the corners of a quad
    # that reaches behind the camera would give a meaningless box.
    polygon = _clip_near(camera.to_camera(quad.corners), near)
    if len(polygon) < 3:
        return
    vertices = polygon @ camera.K.T
    box = _pixel_box(vertices[:, :2] / vertices[:, 2:], camera.width, camera.height)
    if box is None:
        return
    plane = _plane_to_image(quad, camera)
    to_plane = np.linalg.inv(plane)
    mask, inv_z = _coverage(to_plane, box, inv_depth, near=near)
    if not mask.any():
        return
    texture = quad.mipmaps[_mip_level(plane, vertices, quad)]
    warped = _warp_texture(texture, to_plane, box)
    if gain != 1.0:
        warped *= np.float32(gain)
    x0, y0, x1, y1 = box
    np.copyto(colour[y0:y1, x0:x1], warped, where=mask[..., None])
    np.copyto(inv_depth[y0:y1, x0:x1], inv_z, where=mask)


def _background(background: np.ndarray | Sequence[float], width: int, height: int) -> np.ndarray:
    array = np.asarray(background, dtype=np.float32)
    if array.shape == (3,):
        return np.broadcast_to(array, (height, width, 3))
    if array.shape != (height, width, 3):
        raise ValueError(
            f"background must be an RGB triple or an image of shape {(height, width, 3)}, "
            f"got shape {array.shape}"
        )
    return array


def render(
    quads: Sequence[TexturedQuad],
    camera: Camera,
    background: np.ndarray | Sequence[float] = (0.0, 0.0, 0.0),
    *,
    supersample: int = 2,
    shading: Sequence[float] | None = None,
    near: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Render quads seen by `camera`: (image [H, W, 3] uint8 RGB, depth [H, W] float32).

    The nearest surface wins per pixel (depth buffer). Drawing happens on a grid `supersample`
    times finer and is area-averaged, which anti-aliases the edges. `background` (an RGB triple
    or an [H, W, 3] image, 0-255) shows where no quad covers. `shading` multiplies each quad's
    texture by a gain (lighting). Depth is the camera z of the surface at the pixel centre, inf
    where less than half the pixel is covered. Parts of quads closer than `near` are cut away.
    """
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    if near <= 0:
        raise ValueError(f"near must be positive, got {near}")
    gains = [1.0] * len(quads) if shading is None else [float(g) for g in shading]
    if len(gains) != len(quads):
        raise ValueError(f"shading has {len(gains)} gains for {len(quads)} quads")
    back = _background(background, camera.width, camera.height)

    fine = camera.scaled(supersample)
    colour: np.ndarray = np.zeros((fine.height, fine.width, 3), dtype=np.float32)
    inv_depth: np.ndarray = np.zeros((fine.height, fine.width), dtype=np.float32)
    for quad, gain in zip(quads, gains, strict=True):
        _draw_quad(quad, fine, gain, near=near, colour=colour, inv_depth=inv_depth)

    size = (camera.width, camera.height)
    covered: np.ndarray = (inv_depth > 0).astype(np.float32)
    if supersample > 1:
        colour = cv2.resize(colour, size, interpolation=cv2.INTER_AREA)
        covered = cv2.resize(covered, size, interpolation=cv2.INTER_AREA)
        inv_depth = cv2.resize(inv_depth, size, interpolation=cv2.INTER_AREA)
    image = colour + (1.0 - covered)[..., None] * back
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    # The mean of 1/z over the covered fine pixels is 1/z at the pixel centre (1/z is affine).
    depth = np.full(size[::-1], np.inf, dtype=np.float32)
    solid = covered >= 0.5
    depth[solid] = covered[solid] / inv_depth[solid]
    return image, depth
