"""A short OTO run of a tiny BERT classifier that dumps each process's parameters, HSPG state and zero groups.

Started by `tests/test_distributed.py` with `torchrun` on 2 CPU processes (gloo), for mode `accelerate` (a plain loop
with `accelerate.Accelerator` and HSPG) and mode `trainer` (`OTOTrainer`), one after the other in the same processes;
the same functions run in the test process for the single-process reference with the same global batch. Dropout is off
in the tiny model, so a global batch gives the same gradient however it is split across processes.

Usage (from the repository root, with it on `PYTHONPATH`):

```bash
torchrun --nproc_per_node 2 --master_port 29601 tests/distributed_worker.py OUT accelerate trainer trainer_target
accelerate launch --multi_gpu --num_processes 2 --main_process_port 29600 tests/distributed_worker.py OUT accelerate
```
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader
from transformers import get_scheduler, set_seed

from hf_oto import HSPG, OTOTrainer, OTOTrainingArguments, build_zigs
from hf_oto.callbacks import unwrap_optimizer
from hf_oto.trainer import hspg_param_groups
from tests.tiny_models import tiny_model


SETTINGS = dict(
    examples=48,  # 3 optimizer steps per epoch at the global batch below: the run crosses epochs
    global_batch=8,
    accumulation=2,
    steps=12,
    init_steps=5,
    lr=1e-2,
    lmbda=5.0,
    max_group_sparsity=0.5,
    weight_decay=0.01,
    warmup_steps=2,
    max_grad_norm=1.0,
    seed=0,
)
"""One optimizer step sees `global_batch * accumulation` examples; the half-space stage (steps 6-12) zeroes groups up
to the bound."""


def dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 99, (SETTINGS["examples"], 8), generator=generator)
    labels = torch.randint(0, 3, (SETTINGS["examples"],), generator=generator)
    return [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label}
        for ids, label in zip(input_ids, labels)
    ]


def snapshot(model: torch.nn.Module, optimizer: Any, zigs: Any) -> dict[str, Any]:
    """Everything that must agree across processes: parameters, HSPG state, zero groups."""
    hspg = unwrap_optimizer(optimizer)
    return {
        "params": {name: param.detach().clone() for name, param in model.named_parameters()},
        "optimizer": hspg.state_dict(),
        "zero_mask": zigs.zero_mask().clone(),
        "step_count": hspg.step_count,
    }


def train_accelerate(num_processes: int) -> tuple[dict[str, Any], int]:
    """HSPG in a plain Accelerate loop; returns the snapshot and the process index."""
    accelerator = Accelerator(
        cpu=True,  # without it, a CPU-only machine gives each launched process a world of its own
        gradient_accumulation_steps=SETTINGS["accumulation"],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    assert accelerator.num_processes == num_processes, (accelerator.num_processes, num_processes)
    set_seed(SETTINGS["seed"])
    model = tiny_model("bert").train()
    zigs = build_zigs(model)
    loader = DataLoader(
        dataset(),
        batch_size=SETTINGS["global_batch"] // num_processes,
        shuffle=True,
        generator=torch.Generator().manual_seed(SETTINGS["seed"]),
    )
    optimizer = HSPG(
        hspg_param_groups(model, SETTINGS["weight_decay"]),
        zigs,
        lr=SETTINGS["lr"],
        lmbda=SETTINGS["lmbda"],
        init_steps=SETTINGS["init_steps"],
        weight_decay=SETTINGS["weight_decay"],
        max_group_sparsity=SETTINGS["max_group_sparsity"],
    )
    scheduler = get_scheduler(  # a prepared scheduler steps once per process per optimizer step
        "linear",
        optimizer,
        num_warmup_steps=SETTINGS["warmup_steps"] * num_processes,
        num_training_steps=SETTINGS["steps"] * num_processes,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    steps, epoch = 0, 0
    while steps < SETTINGS["steps"]:
        loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), SETTINGS["max_grad_norm"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                steps += 1
                if steps == SETTINGS["steps"]:
                    break
        epoch += 1
    state = snapshot(accelerator.unwrap_model(model), optimizer, zigs)
    # Drop the DDP wrapper now: its reducer holds the process group, which must outlive it (a gloo group destroyed
    # under a live reducer hangs in its destructor). The group itself stays for the next run in this process.
    model = optimizer = loader = scheduler = None
    accelerator.free_memory()
    return state, accelerator.process_index


def train_trainer(num_processes: int, output_dir: str, oto_mode: str = "paper") -> tuple[dict[str, Any], int]:
    """The same run with `OTOTrainer` (the paper mode as above, or the target mode at half the FLOPs with groups
    selected at steps 4, 6 and 8); returns the snapshot and the process index."""
    if oto_mode == "paper":
        knobs = dict(
            oto_mode="paper",
            oto_lambda=SETTINGS["lmbda"],
            oto_init_steps=SETTINGS["init_steps"],
            oto_max_group_sparsity=SETTINGS["max_group_sparsity"],
        )
    else:
        knobs = dict(oto_mode="target", oto_target_flops=0.5, oto_init_steps=4, oto_pruning_fraction=0.5,
                     oto_pruning_periods=3, oto_cost_seq_length=16)  # fmt: skip
    args = OTOTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=SETTINGS["global_batch"] // num_processes,
        gradient_accumulation_steps=SETTINGS["accumulation"],
        max_steps=SETTINGS["steps"],
        learning_rate=SETTINGS["lr"],
        warmup_steps=SETTINGS["warmup_steps"],
        weight_decay=SETTINGS["weight_decay"],
        max_grad_norm=SETTINGS["max_grad_norm"],
        seed=SETTINGS["seed"],
        **knobs,
        use_cpu=True,
        ddp_backend="gloo" if num_processes > 1 else None,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        log_level="error",
        dataloader_num_workers=0,
    )
    trainer = OTOTrainer(tiny_model("bert"), args, train_dataset=dataset())
    assert trainer.args.world_size == num_processes, (trainer.args.world_size, num_processes)
    trainer.train()
    state, index = snapshot(trainer.model, trainer.optimizer, trainer.zigs), trainer.args.process_index
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    return state, index


def main() -> None:
    output_dir, modes = Path(sys.argv[1]), sys.argv[2:]
    for mode in modes:  # one launch, several runs: the processes start (and import torch) once
        if mode == "accelerate":
            state, index = train_accelerate(num_processes=2)
        elif mode == "trainer":
            state, index = train_trainer(num_processes=2, output_dir=str(output_dir / "trainer"))
        elif mode == "trainer_target":
            state, index = train_trainer(num_processes=2, output_dir=str(output_dir / mode), oto_mode="target")
        else:
            raise ValueError(f"Unknown mode {mode!r}; use 'accelerate', 'trainer' and/or 'trainer_target'.")
        torch.save(state, output_dir / f"{mode}-rank{index}.pt")
    gc.collect()  # no DDP reducer left: the process group can go
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
