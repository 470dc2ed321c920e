"""The built-in landmark collection: a deterministic, synthetic photo collection with ground truth.

The demo, the tests and the Structure-from-Motion stage use it as their default data set. Each
landmark is a 3D scene of textured boxes (halls, towers, blocks, facades) with textures of its
own, on a weakly textured ground, photographed from a smooth, wide arc of cameras whose distance
changes about 2x; every photo gets its own exposure, colour cast, haze, blur and noise.
Distractors are landmarks outside the collection, one photo each.

The output is laid out like the revisited Oxford and Paris sets (cnnimageretrieval-pytorch):

    <root>/<name>/jpg/<image>.jpg      lm03_v07 (database), lm03_q1 (query), distractor_012
    <root>/<name>/gnd_<name>.pkl       imlist, qimlist, gnd: per query easy/hard/junk/bbx
    <root>/<name>/cameras.parquet      per image: name, role (db/query/distractor), landmark
                                       (-1: distractor), fx fy cx cy width height, R (9, row-
                                       major, world to camera), t, centre, landmark_centre
    <root>/<name>/config.json          the configuration and its digest
    <root>/<name>/manifest.json        written last: the set is complete only when it exists

The retrieval ground truth comes from the geometry. A photo sees those of its landmark's surface
samples that are in frame and not occluded (by the depth buffer). For a query and a database
photo of the same landmark, the covisibility is the share of the samples seen by the one that
sees fewer that the other sees too (so a zoom-in on the same side scores 1): junk below
`junk_covisibility` (different sides, or the landmark barely visible) or when the shared part
covers under `junk_min_area` of the photo; else hard when the directions from the landmark
centre to the two cameras differ by more than `hard_angle_degrees` or their distances by more
than `hard_scale_ratio`; else easy.

Poses follow OpenCV (x = R @ X + t; x right, y down, z forward; world z up, metres) and so do
pixels: the centre of the top-left pixel is (0, 0), so COLMAP's principal point is (cx + 0.5,
cy + 0.5). Each landmark has a world frame of its own.

Run it with `python -m pipeline.landmarks --conf demo --root data`; `root` may also be
an `s3://` URI.

The package, one job a module, in the order the generator uses them:

    render        the exact perspective renderer of textured planar quads, with a depth buffer
    conf          LandmarksConf (what to generate, validated; its digest) and the CONFS presets
    streams       the seeded random streams every draw comes from
    style         colours and a landmark's style (palette, window, pattern, ornament)
    canvas        texture painting primitives: multi-scale noise, a canvas measured in metres
    details       windows, ornaments and shop signs painted on a facade
    textures      facade, side wall, roof and ground textures
    buildings     the boxes of a landmark's buildings and towers' tiers
    scene         Scene and build_scene: textured quads, surface samples, sun
    cameras       Shot, the arc of cameras, landmark_shots and distractor_shot
    photos        take_photo: rendering plus the photometric variation of each photo
    ground_truth  visible_points, covisibility, viewpoint_change and the easy/hard/junk labels
    dataset       the file names, the camera table and reading a complete collection back
    writer        writing the photos and the tables into a directory
    publish       generate: staging, then publishing through the storage layer (a rename into
                  place locally, an upload with the manifest last to `s3://`)
    cli           the command line (also `python -m pipeline.landmarks`)
"""

from model.datasets.landmarks.cameras import Shot, distractor_shot, landmark_shots
from model.datasets.landmarks.cli import Args, main
from model.datasets.landmarks.conf import (
    CONFS,
    GENERATOR_VERSION,
    MIN_VIEWS_FOR_SFM,
    LandmarksConf,
)
from model.datasets.landmarks.dataset import (
    CONFIG_FILE,
    IMAGE_DIR,
    DatasetConflictError,
    IncompleteDatasetError,
    camera_from_record,
    load_cameras,
    load_ground_truth,
    write_scene_manifest,
)
from model.datasets.landmarks.ground_truth import covisibility, viewpoint_change, visible_points
from model.datasets.landmarks.photos import take_photo
from model.datasets.landmarks.publish import generate
from model.datasets.landmarks.scene import Scene, build_scene, texture_density
from model.datasets.landmarks.style import RGB

__all__ = [
    "CONFIG_FILE",
    "CONFS",
    "GENERATOR_VERSION",
    "IMAGE_DIR",
    "MIN_VIEWS_FOR_SFM",
    "RGB",
    "Args",
    "DatasetConflictError",
    "IncompleteDatasetError",
    "LandmarksConf",
    "Scene",
    "Shot",
    "build_scene",
    "camera_from_record",
    "covisibility",
    "distractor_shot",
    "generate",
    "landmark_shots",
    "load_cameras",
    "load_ground_truth",
    "main",
    "take_photo",
    "texture_density",
    "viewpoint_change",
    "visible_points",
    "write_scene_manifest",
]
