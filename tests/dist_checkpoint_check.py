"""A checkpoint written by N processes, read by M. The tiny policy is built as srpo.main builds it
(with several processes: on the meta device, sharded, filled from rank 0); then either one step is
trained and a checkpoint saved (a folder of DCP shards from several processes, one file from one),
or a checkpoint is loaded. Either way rank 0 writes the whole weights and AdamW state to STATE.pt,
for tests/test_robustness.py to compare.

    torchrun --nproc_per_node N tests/dist_checkpoint_check.py MODEL_DIR OUT_DIR save|load STATE.pt
"""
import os
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import common  # noqa: E402
import memory  # noqa: E402
import curriculum  # noqa: E402
import srpo  # noqa: E402
from dist_update_check import global_batch  # noqa: E402


def check(model_dir: str, out_dir: str, mode: str, state_path: str):
    """One process runs this in the test's own process; several, under torchrun, as a script."""
    rank, world, device = common.setup_dist()
    cfg = srpo.Config(micro_tokens=20, lr=1e-2)
    model = common.build_policy(model_dir, device, rank, world, param_dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    if mode == "save":
        os.makedirs(out_dir, exist_ok=True)  # as srpo.main does before any save
        samples = global_batch(model.config.vocab_size)
        prec = memory.decide_precision(device.type, world, sharded=world > 1)
        srpo.policy_update(model, opt, samples[rank::world], cfg, prec, device,
                           world=world)
        sched.step()
        checkpoint.save_checkpoint(out_dir, model, opt, sched, {"step": 1} | curriculum.Curriculum().state_dict(), rank, cfg)
    else:
        path = checkpoint.find_checkpoint(out_dir)
        small = checkpoint.open_checkpoint(path, cfg, rank, world)
        checkpoint.load_checkpoint(path, small, model, opt, sched, rank)
    model_sd, opt_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"model": model_sd, "optimizer": opt_sd, "sched_steps": sched.last_epoch}, state_path)
    common.close_dist()


if __name__ == "__main__":
    check(*sys.argv[1:5])
    common.exit_torchrun()
