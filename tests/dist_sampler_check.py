"""The sampler's copy of an FSDP2-sharded policy (common.inference_copy), on 2 CPU processes over
gloo: which dtype its all-gathers move, and whether its weights equal the fp32 gather cast after.
tests/test_rollout.py runs it and reads the result.

    torchrun --nproc_per_node 2 tests/dist_sampler_check.py OUT.pt
"""
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from model import Transformer  # noqa: E402
from common import inference_copy  # noqa: E402


class GatherDtypes(TorchDispatchMode):
    """Records the dtype of every tensor an all-gather sends (DTensor.full_tensor's collective)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "all_gather" in str(func):
            self.dtypes.append(str(args[0].dtype))
        return func(*args, **(kwargs or {}))


def main(out: str):
    from transformers import Qwen2Config
    rank, world, device = common.setup_dist()
    cfg = Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)          # the same weights on every rank, then sharded
    model = Transformer(cfg)
    with torch.no_grad():         # values that bf16 cannot hold exactly, so the rounding shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    common.shard_model(model, param_dtype=torch.bfloat16)
    # Today's recipe, for comparison: gather fp32, then cast.
    before = {n: t.full_tensor().to(torch.bfloat16) for n, t in model.state_dict().items()}
    with GatherDtypes() as seen:
        copy = inference_copy(model, dtype=torch.bfloat16, device="cpu")
    same = {n: torch.equal(copy.state_dict()[n], t) for n, t in before.items()}
    if rank == 0:
        torch.save({"gather_dtypes": seen.dtypes, "bitwise_equal": same,
                    "copy_dtypes": sorted({str(t.dtype) for t in copy.state_dict().values()})}, out)
    common.close_dist()


if __name__ == "__main__":
    main(sys.argv[1])
    common.exit_torchrun()
