"""DistributedDataParallel on 2 CPU processes (gloo): metrics reduced over ranks, one writer, equal weights."""
import json
import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, cache):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), MEMORYMAMBA_CACHE=cache)
    from memorymamba.config import resolve
    from memorymamba.train import train
    cfg = resolve(overrides=dict(image_size=32, synthetic_train_per_class=5, synthetic_val_per_class=3,
                                 synthetic_test_per_class=3, batch_size=4, epochs=2, lr=2e-3, progress=False,
                                 threads=1, device="cpu", output=os.path.join(out_dir, "runs"), name="ddp",
                                 model_args={"depths": [1, 1, 1, 1], "dims": 8}))
    rep = train(cfg)
    from memorymamba.train import load_checkpoint
    state = load_checkpoint(os.path.join(out_dir, "runs", "ddp")) if rank == 0 else None
    torch.save({"report": {k: rep[k] for k in ("test", "val", "world_size", "history")}, "state": state},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_cpu_processes(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path / "cache")), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    a, b = r0["report"], r1["report"]
    print("rank0 test", a["test"]["accuracy"], "rank1 test", b["test"]["accuracy"])
    assert a["world_size"] == 2
    # 18 test / 18 val images split 9 + 9 over the ranks, counts all-reduced: every image counted once
    assert a["test"]["n"] == 18 and a["val"]["n"] == 18
    # train loss/accuracy are all-reduced, so both ranks log the same numbers
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [[h[k] for k in keys] for h in a["history"]] == [[h[k] for k in keys] for h in b["history"]]
    assert a["test"]["confusion"] == b["test"]["confusion"]
    run = tmp_path / "runs" / "ddp"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2, "only rank 0 writes metrics"
    assert json.loads(lines[-1])["epoch"] == 2
    assert r0["state"]["epoch"] == 2 and not any(".tmp" in f for f in os.listdir(run))
