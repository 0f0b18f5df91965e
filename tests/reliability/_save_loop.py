"""A process that keeps saving adapters into one directory until it is killed.

``python _save_loop.py DIR SLOW_FILE PAUSE_AT PAUSE_VERSION PAUSE_EXTRA [--optimizer]``

Saves version 0 normally (the known-good checkpoint), then versions 1, 2, ... in a loop, each a
different adapter (alternately a rank-2 TL6 and a bigger rank-6 LoRA, with distinct values; with
``--optimizer`` always the TL6, saved together with an Adam state).
Every write of the file named ``SLOW_FILE`` goes through a slow writer (16 chunks with sleeps),
so a kill can land while its temporary file is half written. Markers on stdout (flushed) tell
the test where the process is:

- ``BEGIN i SHA``: about to save version i, whose content hash is SHA;
- ``MIDWAY i`` / ``WRITTEN i``: half / all of SLOW_FILE's bytes are in its temp file (not renamed);
- ``REPLACED i NAME``: NAME was just renamed into place;
- ``DONE i``: ``save_adapter`` returned.

At the marker ``PAUSE_AT`` of version ``PAUSE_VERSION`` (and, for ``REPLACED``, file name
``PAUSE_EXTRA``; ``-`` for any) the process stops (sleeps 60 s) until the test's SIGKILL, so
the kill lands at exactly that point however slow the machine is.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn as nn

import tiedlora_kernels.integrations.checkpoint as ckpt
from safetensors.torch import save as safetensors_bytes
from tiedlora_kernels import TiedLoRAConfig, adapter_named_parameters, inject, save_adapter


class Net(nn.Module):
    """Three linear layers of one kind (``proj``), so tied factors are shared by all three."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(16, 16)}) for _ in range(3))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer["proj"](x))
        return x


def version(i: int, same_config: bool = False) -> nn.Module:
    """Adapter version i: distinct values and, unless ``same_config``, a distinct config (every
    other version is a bigger rank-6 LoRA); with ``same_config`` every version is a rank-2 TL6,
    as when one training run saves a checkpoint per epoch."""
    model = Net()
    bigger = i % 2 and not same_config
    cfg = TiedLoRAConfig(rank=6, preset="lora", seed=i) if bigger else TiedLoRAConfig(rank=2, preset="tl6", seed=0)
    inject(model, cfg)
    g = torch.Generator().manual_seed(1000 + i)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def saved_hash(model: nn.Module) -> str:
    """The content hash ``save_adapter`` will write for this model (trained tensors only here)."""
    return ckpt.content_hash({n: p.detach() for n, p in adapter_named_parameters(model) if p.requires_grad})


def main() -> None:
    directory, slow_file, pause_at = sys.argv[1], sys.argv[2], sys.argv[3]
    pause_version, pause_extra = int(sys.argv[4]), sys.argv[5]
    with_optimizer = "--optimizer" in sys.argv[6:]
    current = [0]

    def say(line: str) -> None:
        print(line, flush=True)
        word, i, *rest = line.split()
        if (word, int(i)) == (pause_at, pause_version) and pause_extra in ("-", *rest):
            time.sleep(60)

    def slow_save_file(tensors, filename, metadata=None):
        data = safetensors_bytes(tensors, metadata=metadata)
        slow = os.path.basename(filename).startswith("." + slow_file + ".")
        step = max(1, len(data) // 16)
        with open(filename, "wb") as f:
            for k, start in enumerate(range(0, len(data), step)):
                f.write(data[start:start + step])
                f.flush()
                if slow:
                    if k == 8:
                        say(f"MIDWAY {current[0]}")
                    time.sleep(0.005)
        if slow:
            say(f"WRITTEN {current[0]}")

    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        say(f"REPLACED {current[0]} {os.path.basename(dst)}")

    def optimizer_for(model):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        return opt

    model = version(0, with_optimizer)
    opt = optimizer_for(model) if with_optimizer else None  # its step moves the model: hash after it
    print(f"BEGIN 0 {saved_hash(model)}", flush=True)
    save_adapter(model, directory, optimizer=opt)
    print("DONE 0", flush=True)

    ckpt.save_file = slow_save_file
    os.replace = replace
    for i in range(1, 40):
        current[0] = i
        model = version(i, with_optimizer)
        opt = optimizer_for(model) if with_optimizer else None
        say(f"BEGIN {i} {saved_hash(model)}")
        save_adapter(model, directory, optimizer=opt)
        say(f"DONE {i}")


if __name__ == "__main__":
    main()
