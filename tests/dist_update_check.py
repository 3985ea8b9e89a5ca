"""One policy update of the tiny model, run as one process or under torchrun with FSDP2 (gloo on
CPU). Each rank takes its share of the same global batch; the result (loss, gradients, updated
weights) must not depend on the number of processes. tests/test_srpo.py runs and compares it.

    python tests/dist_update_check.py MODEL_DIR OUT.pt [shared|unshared [global|grouped]]
    torchrun --nproc_per_node 2 tests/dist_update_check.py MODEL_DIR OUT.pt [...]

shared/unshared: --shared_prompts on (the default) or off; global/grouped: the batch, global_batch
(8 prompts of one response each) or grouped_batch (3 prompts x 4 responses).
"""
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import memory  # noqa: E402
import srpo  # noqa: E402


def global_batch(vocab: int) -> list:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(8):  # uneven lengths, so ranks get different token counts and micro-batches
        n_prompt = 3 + i % 4
        n_resp = 2 + (i * 5) % 7
        tokens = torch.randint(0, vocab, (n_prompt + n_resp,), generator=g).tolist()
        # logp_old away from the current policy's, so some ratios leave [1-eps, 1+eps] and clip
        logp_old = (-torch.rand(n_resp, generator=g) * 6).tolist()
        adv = float(torch.randn((), generator=g))
        samples.append(srpo.Sample(tokens, n_prompt, logp_old, adv))
    return samples


def grouped_batch(vocab: int) -> list:
    """3 prompts (7, 3 and 12 tokens) x 4 responses of 1 to 9 tokens; the 3-token prompt's group has zero advantage."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for p, (n_prompt, scale) in enumerate([(7, 1.0), (3, 0.0), (12, 1.0)]):
        prompt = torch.randint(0, vocab, (n_prompt,), generator=g).tolist()
        for r in range(4):
            n = [1, 5, 9, 3][(r + p) % 4]
            samples.append(srpo.Sample(prompt + torch.randint(0, vocab, (n,), generator=g).tolist(), n_prompt,
                                       (-torch.rand(n, generator=g) * 6).tolist(),
                                       scale * float(torch.randn((), generator=g))))
    return samples


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "shared"
    batch = sys.argv[4] if len(sys.argv) > 4 else "global"
    rank, world, device = common.setup_dist()
    torch.manual_seed(0)
    # As srpo.main builds it: with 2 processes on the meta device, sharded, filled from rank 0.
    model = common.build_policy(model_dir, device, rank, world, param_dtype=torch.float32)
    cfg = srpo.Config(micro_tokens=20, lr=1e-2, grad_clip=0.5, shared_prompts=mode == "shared")
    # SGD: the weights after one step are then a linear function of the gradient, so they compare
    # as tightly as the gradients do (Adam's first step is ~lr * sign(grad), noise included).
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    samples = (global_batch if batch == "global" else grouped_batch)(model.config.vocab_size)
    prec = memory.decide_precision(device.type, world, sharded=world > 1)
    stats = srpo.policy_update(model, opt, samples[rank::world], cfg, prec, device,
                               world=world)
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    grads = {n: full(p.grad).detach().clone() for n, p in model.named_parameters()}
    weights = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"stats": dataclasses.asdict(stats), "grads": grads, "weights": weights}, out)
    common.close_dist()


if __name__ == "__main__":
    main()
    common.exit_torchrun()
