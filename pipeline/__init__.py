"""Batch stages on Ray Data and Ray tasks: each name here is a stage, ``python -m pipeline.NAME``.

Each stage has a typed config (its flags) and a ``run(config)`` returning its output URI; what
two stages share lives in ``model/`` (or ``cluster/`` for Serve services), and no stage imports
another. The chain, each stage's input → output::

    photos ─ingest→ images.parquet ─extract→ descriptors ─group→ groups ─sfm→ sfm ─pairs→ pairs
      ─train→ checkpoint (─whiten→ checkpoint + Lw) ─extract→ descriptors ─index→ index/vN
      ─serve→ HTTP search

    ingest    --source SRC --output OUT                          → OUT/images.parquet
    extract   --images IMAGES --output DESC [--weights W]        → DESC/*.parquet + manifest
    group     --images IMAGES --descriptors DESC --output GROUPS → GROUPS/groups.parquet
    sfm       --images IMAGES --groups GROUPS --output SFM       → SFM/sfm_images.parquet,
                                                                   sfm_models.parquet, models/
    pairs     --sfm SFM --output PAIRS                           → PAIRS/pairs.parquet
    train     --pairs PAIRS --images IMAGES --output TRAIN       → model.pt + meta.json
                                                                   (+ whitening.npz)
    whiten    --descriptors DESC --pairs PAIRS --output LW       → model.pt + meta.json
                                                                   + whitening.npz
    index     --descriptors DESC --output INDEX [--shards S]     → INDEX/vN/ + manifest.json
    serve     --index INDEX [--host 127.0.0.1] [--port 8000]     → a Ray Serve app (HTTP search)

    evaluate  --dataset NAME --data-root ROOT [--weights W]      → metrics.json, report.html
              (a revisited data set and a network)
    demo      [--photos DIR]          the off-the-shelf comparison → results.json, report-*.html
    landmarks --conf demo --root data                            → the built-in collection
"""
