"""Peers: the public PyTorch implementations users run today, registered as each
mechanism's ``peer`` implementation so the harness times them in the same sweep
(``bench run --impls reference,peer``).

Each wrapper hands the package the mechanism's q, k, v and the package
configuration closest to the mechanism's config; what still differs is
the impl's ``variant`` (the row's note, and ``err_oracle`` stays empty where
the package computes another variant). A peer whose package does not import
is unavailable (a skipped row naming the package); ``pip install
"attn-zoo[peers]"`` installs them, pinned to versions that leave torch alone.

| mechanism | package | wrapped |
| --- | --- | --- |
| lsh | reformer-pytorch | ``LSHAttention`` |
| routing | routing-transformer, local-attention | ``KmeansAttention`` + ``LocalAttention`` |
| xl | local-attention | ``LocalAttention``, one segment and ``mem_len / segment_len`` back |
| compressive | compressive-transformer-pytorch | ``SelfAttention``, segment by segment |

No package exists for Sparse Transformer's patterns (OpenAI's ``blocksparse`` is
TensorFlow and CUDA; DeepSpeed's sparse attention needs CUDA and Triton 1.0),
for adaptive span or for the authors' Transformer-XL (research code in
facebookresearch/adaptive-span and kimiyoung/transformer-xl, not packages);
SDPA is dense attention's peer already.
"""

# isort: off
from attn_zoo.peers import reformer, routing, xl, compressive  # noqa: F401
