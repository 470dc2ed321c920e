"""The train stage's worker side, one module per job.

``images``: photos to tensors, augmentation, the network run over many images at once
(grouped by size, bf16 and channels-last on GPUs); ``gem``: the GeM mode's epoch (pool described
into the mining actor, hard negatives, contrastive tuples) and its held-out mAP; ``cgd``: the CGD
mode's epoch (P×K batches, batch-hard triplet plus label-smoothed cross-entropy) and its
held-out Recall@K. ``pipeline.train`` is the driver and the Ray Train loop around them.
"""
