"""The training loop every Ray Train worker runs: a DeepSpeed ZeRO engine fed by this worker's slice of every
global micro-batch of the ordered training stream.

setup (model, engine, resume) → train (steps, logging, eval, checkpoints) → final eval, test, and export.
Every collective (forward under ZeRO-3, all_reduce, save_checkpoint, ray.train.report) is reached by all ranks
the same number of times: every rank reads the same stream in whole global micro-batches, so every rank runs the
same steps.
"""

import functools
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn

from cluster.console import worker_line
from core.errors import UserError
from pipelines.chat import IGNORE
from trainers.checkpoints import (
    CKPT_TAG,
    HF_CONFIG_DIR,
    HF_DIR,
    LoopState,
    intact_checkpoint,
    verify_weights_only,
    write_manifest,
)
from trainers.deepspeed_ops import import_deepspeed, use_own_op_builds
from trainers.lora import save_lora_model, with_adapters
from trainers.loss import TokenLoss, exact_for


def train_loop_per_worker(config: dict) -> None:
    """Setup, restore, the epochs of steps (read top to bottom below), and the final evaluation and export."""
    quiet_libraries()
    use_own_op_builds()  # before DeepSpeed loads its ops
    import_deepspeed()  # first, before any of its modules is imported here
    cfg, plan = config["run"], config["plan"]  # the validated RunConfig, and the driver's WorkerPlan
    train = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    seed_everything(train.seed)  # weights zeray creates (LoRA adapters, new heads): the same on every rank

    model, tokenizer, loss_of = load_model(cfg.model, train, plan.packing, rank)
    checkpoint, own, state = find_checkpoint(plan.init_checkpoint, rank)
    # ZeRO-1/2/3 shard the optimizer by rank: states written by another number of workers (an elastic run that
    # grew or shrank) are converted to DeepSpeed's universal checkpoint and loaded as such
    universal = state is not None and (state.world or world) != world and train.zero_stage > 0
    engine, scheduler, dtype = setup_engine(model, cfg, plan, world, device, universal)
    # what the summary reports: checkpointing on in transformers' own view, and acting (training mode)
    checkpointing = engine.module.is_activation_checkpointing and engine.module.training
    seed_everything(rng_seed(train.seed, rank, 0))  # dropout: each rank its own stream
    step, epoch, skip_batches = 0, 0, 0
    if checkpoint:
        restore(engine, checkpoint, state, universal, rank, world)
        step, epoch, skip_batches = state.step, state.epoch, state.batches_in_epoch
        seed_everything(rng_seed(train.seed, rank, step))  # the streams the run drew from after that checkpoint
        # this run's settings and schedule from here on: another run's state carries its own, and a run extended
        # past its last checkpoint (a larger max_steps) would take its next step at the shorter schedule's rate
        apply_optimizer_settings(scheduler, train.lr, train.weight_decay)
        if rank == 0:
            say(
                f"resumed from checkpoint at step {step} (epoch {epoch + 1}, batch {skip_batches})"
                + ("" if own else f" of {checkpoint.path}")
            )

    train_shard = ray.train.get_dataset_shard("train")  # the whole split: see the epoch loop
    pad_id = plan.pad_token_id
    last_eval = None
    score = functools.partial(
        evaluate,
        engine,
        loss_of,
        batch_size=train.micro_batch_size,
        pad_id=pad_id,
        device=device,
        packed=plan.packing,
        rank=rank,
        world=world,
    )
    save = functools.partial(save_checkpoint, engine, model, tokenizer, cfg.model.lora, train.zero_stage, rank)

    if checkpoint is None and plan.eval_base:  # the model as loaded: what the fine-tune is measured against
        base = score("val")
        ray.train.report({"step": 0, "epoch": 0, **{f"base_{k}": v for k, v in base.items()}})
        if rank == 0:
            say(
                f"eval of the base model: loss {base['eval_loss']:.4f} perplexity {base['eval_perplexity']:.2f} "
                f"({base['eval_s']:.1f} s)"
            )
    if checkpoint and own is None:
        # what this run starts from, evaluated: equal to the source run's validation loss at that step when the
        # weights were really taken over
        last_eval = {**score("val"), "step": step}
        ray.train.report({**last_eval, "epoch": epoch, "started_from": plan.init_checkpoint})  # as named

    # (after the evaluations above: the first window's throughput and ETA, and the peak memory, are training's)
    window = Window(
        first_step=step, flops_per_token=plan.flops_per_token, world=world, peak_flops=peak_flops(device, dtype)
    )
    started = time.perf_counter()
    reset_peak_memory()
    mb, total_steps = train.micro_batch_size, plan.total_steps
    collate = Collate(pad_id, device, plan.packing)
    full = train.max_workers  # the global batch is defined by this many workers' micro-batches
    while step < total_steps and epoch < train.epochs:
        # Every rank reads the whole (seeded, ordered) training stream in global micro-batches of mb x max_workers
        # rows and takes its share of each step's (see deal()): each optimizer step then sees the same rows
        # whatever the number of workers, so the loss curve does not depend on it. Reading token ids is cheap
        # next to training on them.
        batches = train_shard.iter_batches(
            batch_size=mb * full,
            batch_format="numpy",
            prefetch_batches=2,
            drop_last=True,
            # a buffer of global micro-batches varies the order per epoch, reproducibly and the same on every rank
            local_shuffle_buffer_size=mb * full * 16,
            local_shuffle_seed=train.seed + epoch,
        )
        used = 0  # global micro-batches of this epoch consumed (also the resume position)
        pending: list[dict] = []
        for rows in batches:
            if used < skip_batches:
                used += 1
                continue
            pending.append(rows)
            used += 1
            if len(pending) < train.grad_accum:
                continue
            group = [collate(part) for part in deal(pending, mb, full, rank, world)]
            pending = []
            lr = scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler moves on inside it)
            loss_sum, tokens = train_step(engine, loss_of, group, world)
            if not math.isfinite(loss_sum):  # the same all-reduced value on every rank: all stop here together
                ray.train.report({"step": step + 1, "epoch": epoch, "loss": loss_sum / tokens, "diverged": True})
                return
            window.add(loss_sum, tokens, real_tokens=sum(b["num_tokens"] for b in group))
            step += 1
            metrics = None
            if step % train.log_every == 0 or step == total_steps:
                metrics = window.flush(step, epoch, lr, total_steps, rank)
            checkpoint_now = step % train.checkpoint_every == 0 and step < total_steps  # the last one: below
            # a checkpoint carries the validation loss of its own weights: Ray Train ranks checkpoints by it
            if step % train.eval_every == 0 or step == total_steps or checkpoint_now:
                last_eval = {**score("val"), "step": step}
                metrics = {**(metrics or {"step": step, "epoch": epoch}), **last_eval}
                if rank == 0:
                    say(
                        f"eval step {step}: loss {last_eval['eval_loss']:.4f} "
                        f"perplexity {last_eval['eval_perplexity']:.2f} ({last_eval['eval_s']:.1f} s)"
                    )
            if checkpoint_now:
                save(metrics, LoopState(step, epoch, used, world))
                seed_everything(rng_seed(train.seed, rank, step))  # as a run resumed from here does
            elif metrics is not None:
                ray.train.report(metrics)
            if step >= total_steps:
                break
        skip_batches = 0
        if step >= total_steps:
            break
        epoch += 1

    # The end: validation (if the last step did not just do it), the held-out test split, and the HF model.
    final = last_eval if last_eval is not None and last_eval["step"] == step else score("val")
    final = finish(final, score("test"), world)
    final.update(
        {
            "step": step,
            "epoch": epoch,
            "train_wall_s": time.perf_counter() - started,
            "gradient_checkpointing": checkpointing,
            "chunked_loss": loss_of.head is not None,
        }
    )
    save(final, LoopState(step, epoch, 0, world), export=True)


def quiet_libraries() -> None:
    # DeepSpeed still calls torch's deprecated all_gather_into_tensor path; the warning is not the user's.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # zeray prints its own progress; Ray Train's INFO line per report and Ray Data's per evaluation pass would bury
    # it (the run's LoggingConfig reaches workers only with Ray's structured worker logging on)
    for name in ("ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def load_model(model_cfg, train, packed: bool, rank: int) -> tuple:
    """(model, tokenizer, loss): the model in fp32 master weights (DeepSpeed casts for bf16/fp16 itself), with
    gradient checkpointing and LoRA adapters as configured, its packing isolation checked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.name_or_path,
        dtype=torch.float32,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True,
        attn_implementation=None if model_cfg.attn_implementation == "auto" else model_cfg.attn_implementation,
    )
    if train.gradient_checkpointing:  # each layer's activations recomputed in the backward, only its input kept
        # (non-reentrant: gradients reach LoRA adapters behind frozen inputs, and it nests with ZeRO-3's hooks)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    if packed:
        check_packing_isolation(model, model_cfg.name_or_path)
    if model_cfg.lora:
        model = with_adapters(model, model_cfg.lora, model_cfg.name_or_path)
    chunked = train.chunked_loss and exact_for(model)
    if train.chunked_loss and not chunked and rank == 0:
        say("loss: this model's logits are not its LM head applied to its last hidden states; plain loss used")
    return model, tokenizer, TokenLoss(model, chunked)


def find_checkpoint(init_checkpoint: str | None, rank: int):
    """(checkpoint to start from or None, this run's own latest or None, its LoopState or None): this run's latest
    (a restart after a failure, or a re-run command), else, under PBT, the better trial's checkpoint this run
    continues from."""
    own = ray.train.get_checkpoint()
    checkpoint = own or (ray.train.Checkpoint(init_checkpoint) if init_checkpoint else None)
    if own is not None:  # one cut short on disk: the newest intact one before it, with a warning
        path, problem = intact_checkpoint(own.path, own.filesystem)
        if problem and rank == 0:
            say(f"warning: checkpoint {own.path} is damaged ({problem}); resuming from {path} instead")
        checkpoint = ray.train.Checkpoint(path, filesystem=own.filesystem)
    # (read where it is: a checkpoint in an object store is downloaded once, by restore())
    state = LoopState.read(checkpoint.path, checkpoint.filesystem) if checkpoint else None
    return checkpoint, own, state


def setup_engine(model, cfg, plan, world: int, device, universal: bool) -> tuple:
    """(DeepSpeed engine in training mode, its LR scheduler, the precision it trains in)."""
    import deepspeed
    from transformers import get_scheduler

    from trainers.deepspeed_config import deepspeed_config, precision
    from trainers.deepspeed_fixes import defer_muon_compile, share_fp32_master_partitions

    train, on_gpu = cfg.train, device.type == "cuda"
    dtype = precision(cfg.model, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    total_steps = plan.total_steps
    warmup = int(train.warmup_ratio * total_steps)
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[train.lr_schedule]
    per_rank = -(-train.grad_accum * train.max_workers // world)  # micro-batches per rank per step (see deal())
    share_fp32_master_partitions()
    defer_muon_compile()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(
            train,
            world,
            dtype,
            model.config.get_text_config().hidden_size,
            plan.deepspeed,
            grad_accum=per_rank,
            load_universal=universal,
        ),
        lr_scheduler=lambda opt: get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=total_steps),
    )
    # from_pretrained returns the model in eval mode: dropout and gradient checkpointing act only in training mode
    engine.train()
    return engine, scheduler, dtype


def restore(engine, checkpoint, state: LoopState, universal: bool, rank: int, world: int) -> None:
    """The engine's weights, optimizer and scheduler from `checkpoint` (a local copy of one in an object store),
    checked to hold no pickled code first."""
    with checkpoint.as_directory() as path:
        verify_weights_only(os.path.join(path, CKPT_TAG))  # before DeepSpeed unpickles anything
        if universal:
            if rank == 0:
                say(
                    f"the checkpoint was written by {state.world} workers, this run has {world}: converting it "
                    "to a universal checkpoint"
                )
            with universal_checkpoint(path, rank, world) as converted:
                engine.load_checkpoint(converted, tag=CKPT_TAG)
        else:
            engine.load_checkpoint(path, tag=CKPT_TAG)


def save_checkpoint(
    engine, model, tokenizer, lora, zero_stage: int, rank: int, metrics: dict, state: LoopState, export: bool = False
) -> None:
    """Every rank writes its DeepSpeed shard; Ray Train merges them into one checkpoint in storage."""
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG)
        if rank == 0:
            state.write(tmp)
            # config + tokenizer make every checkpoint exportable on its own (`zeray export`)
            model.config.save_pretrained(os.path.join(tmp, HF_CONFIG_DIR))
            tokenizer.save_pretrained(os.path.join(tmp, HF_CONFIG_DIR))
            if lora:
                model.peft_config["default"].save_pretrained(os.path.join(tmp, HF_CONFIG_DIR))
        if export:
            export_hf_model(model, tokenizer, tmp, rank, zero_stage, lora)
        write_manifest(tmp, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def finish(last_eval: dict, test: dict, world: int) -> dict:
    """The final metrics: the last validation, the test split's, and how many machines the workers ran on."""
    return {
        **last_eval,
        "nodes": len(set(node_ids(world))),  # (the last time they started)
        "world_size": world,
        "test_loss": test["eval_loss"],
        "test_perplexity": test["eval_perplexity"],
        "test_token_accuracy": test["eval_token_accuracy"],
        "final": True,
    }


def apply_optimizer_settings(scheduler, lr: float, weight_decay: float) -> None:
    """Set the peak learning rate and weight decay of a scheduler and optimizer restored from a checkpoint
    (which carries the values of the run that wrote it), and the rate of this run's schedule at the position
    restored. For the run's own checkpoint, with its settings unchanged, these are the values restored."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
        group["weight_decay"] = weight_decay
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def deal(units: list[dict], mb: int, full: int, rank: int, world: int) -> list[dict]:
    """This rank's micro-batches of one optimizer step: `units` are its grad_accum global micro-batches of
    mb x `full` rows (full = the run's max workers); their mb-row slices are dealt round-robin over the `world`
    ranks running now. A rank left one short (the slices do not divide evenly) gets an all-padding micro-batch, so
    that every rank runs the same number of forward/backward passes (ZeRO-3's collectives, DeepSpeed's
    accumulation count). With world == full, rank r simply takes slice r of every unit."""
    slices = [{k: v[pos * mb : (pos + 1) * mb] for k, v in unit.items()} for unit in units for pos in range(full)]
    mine = slices[rank::world]
    per_rank = -(-len(slices) // world)
    while len(mine) < per_rank:
        mine.append(padding(slices[0]))
    return mine


def padding(rows: dict) -> dict:
    """Rows that run through the model but carry no label and no real token: they add nothing to loss or
    gradients."""
    labels = np.empty(len(rows["labels"]), dtype=object)
    labels[:] = [np.full(len(label), IGNORE, dtype=np.int64) for label in rows["labels"]]
    return {**rows, "labels": labels, "num_tokens": np.zeros_like(rows["num_tokens"])}


def node_ids(world: int) -> list[str]:
    """The Ray node each rank runs on, by rank."""
    nodes = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return nodes


@contextmanager
def universal_checkpoint(path: str, rank: int, world: int):
    """`path`'s DeepSpeed checkpoint converted by DeepSpeed's ds_to_universal into a folder on this node (by the
    lowest rank on it; the others wait): a checkpoint of another world size for ZeRO-1/2/3 to load."""
    nodes = node_ids(world)
    leader = nodes.index(nodes[rank])
    folder = None
    if rank == leader:
        folder = tempfile.mkdtemp(prefix="zeray-universal-")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                os.path.join(path, CKPT_TAG),
                "--output_folder",
                os.path.join(folder, CKPT_TAG),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
                "--inject_missing_state",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder = RuntimeError(f"DeepSpeed's ds_to_universal failed on {path}: {done.stderr.strip()[-2000:]}")
    folders = [None] * world
    dist.all_gather_object(folders, folder)
    if isinstance(folders[leader], Exception):
        raise folders[leader]
    try:
        yield folders[leader]
    finally:
        dist.barrier()  # every rank of the node has loaded it
        if rank == leader:
            shutil.rmtree(folder, ignore_errors=True)


def train_step(engine, loss_of: TokenLoss, group: list[dict], world: int) -> tuple[float, int]:
    """One optimizer step over `group` micro-batches; returns (summed loss, label tokens) over all ranks.

    The loss is the mean over every real label token of the global batch, whatever their split across
    micro-batches and ranks: each micro-batch's summed loss is scaled by world*ga/global_tokens because
    DeepSpeed divides by the accumulation steps and averages gradients over ranks.
    """
    local_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
    global_tokens = max(all_reduce([float(local_tokens)])[0], 1.0)
    loss_sum = 0.0
    for batch in group:
        summed = loss_of(engine, batch)
        engine.backward(summed * (world * len(group) / global_tokens))
        engine.step()
        loss_sum += summed.item()
    return all_reduce([loss_sum])[0], int(global_tokens)


def all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    """`values` summed (or `op`) over the ranks, in float64, on the device the process group communicates on
    (NCCL, Ray Train's backend on GPUs, takes only CUDA tensors)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


@torch.no_grad()
def evaluate(
    engine, loss_of: TokenLoss, split: str, *, batch_size: int, pad_id: int, device, packed: bool, rank: int, world: int
) -> dict:
    """Loss, perplexity and next-token accuracy over the whole split, the work shared by the ranks.

    Every rank reads the whole split (cheap: token ids) in global micro-batches of batch_size x world rows and
    evaluates its own slice of each, so micro-batch k of the split goes to rank k mod world: the same rows as one
    worker evaluates, hence the same numbers for any number of workers, in about 1/world of the compute. The last,
    partial global micro-batch is shared evenly (its rows would otherwise fall to the first ranks, which the others
    wait for). (The split is not sharded by Ray Data: `streaming_split(equal=True)` would drop up to world-1 rows
    and tie the numbers to the block layout.) A rank left without rows at the end runs a padding micro-batch, which
    keeps ZeRO-3's collective forwards in step; the sums are then all-reduced.
    """
    began = time.perf_counter()
    engine.eval()
    collate = Collate(pad_id, device, packed)
    sums = torch.zeros(3, dtype=torch.float64)  # loss, tokens, correct
    for rows in ray.train.get_dataset_shard(split).iter_batches(
        batch_size=batch_size * world, batch_format="numpy", prefetch_batches=2
    ):
        n = len(rows["input_ids"])  # batch_size x world, but at the end of the split
        mine = {k: v[rank * n // world : (rank + 1) * n // world] for k, v in rows.items()}
        batch = collate(mine if len(mine["input_ids"]) else padding({k: v[:1] for k, v in rows.items()}))
        sums[0] += loss_of(engine, batch).item()
        sums[1] += int((batch["labels"][:, 1:] != IGNORE).sum())
        sums[2] += int(loss_of.correct)
    loss_sum, tokens, correct = all_reduce(sums.tolist()) if world > 1 else sums.tolist()
    engine.train()
    loss = loss_sum / max(tokens, 1.0)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "eval_token_accuracy": correct / max(tokens, 1.0),
        "eval_tokens": int(tokens),
        "eval_s": time.perf_counter() - began,
    }


def export_hf_model(model, tokenizer, checkpoint_dir: str, rank: int, zero_stage: int, lora) -> None:
    """Rank 0 writes the full model (safetensors) and tokenizer into the checkpoint's HF_DIR — for LoRA the merged
    model or the adapters, as `model.lora.export` says; under ZeRO-3 all ranks gather the shards first."""
    import contextlib

    import deepspeed

    out_dir = os.path.join(checkpoint_dir, HF_DIR)
    gather = (
        deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        if zero_stage == 3
        else contextlib.nullcontext()
    )
    state = None
    with gather:  # under ZeRO-3 every rank takes part in gathering; rank 0 writes the full weights
        if rank == 0 and lora:
            state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
        elif rank == 0:
            model.save_pretrained(out_dir, safe_serialization=True)
    if rank == 0:
        if lora:  # merged into a fresh copy: the trained module stays as it is
            save_lora_model(state, os.path.join(checkpoint_dir, HF_CONFIG_DIR), out_dir, lora.export)
        tokenizer.save_pretrained(out_dir)
    dist.barrier()


def rng_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a rank's random streams from `step` on: reseeding at every checkpoint makes a run resumed from
    one draw the same dropout as the run that wrote it."""
    return seed + rank + 1_000_003 * step


class Collate(NumpyBatchCollateFn):
    """Pad a batch of variable-length rows to its longest row (dynamic padding).

    Packed rows go to the model with their restarting `position_ids` and no attention mask, which is how
    transformers recognises packed sequences and keeps them from attending to each other (the padding becomes one
    more sequence of its own); unpacked rows get the usual padding mask.
    """

    def __init__(self, pad_id: int, device, packed: bool):
        self.pad_id = pad_id
        self.device = device
        self.packed = packed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        rows = batch["input_ids"]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lab, p) in enumerate(zip(rows, batch["labels"], batch["position_ids"])):
            n = len(r)
            ids[i, :n] = torch.from_numpy(np.asarray(r, dtype=np.int64))
            labels[i, :n] = torch.from_numpy(np.asarray(lab, dtype=np.int64))
            positions[i, :n] = torch.from_numpy(np.asarray(p, dtype=np.int64))
            positions[i, n:] = torch.arange(width - n)
            mask[i, :n] = 1
        out = {"input_ids": ids, "labels": labels, "position_ids": positions}
        if not self.packed:
            out["attention_mask"] = mask
        out = {k: v.to(self.device) for k, v in out.items()}
        out["num_tokens"] = int(batch["num_tokens"].sum())  # real tokens, padding excluded
        return out


@torch.no_grad()
def check_packing_isolation(model, name: str) -> None:
    """Packing is only correct if the model keeps packed sequences apart; check it on this model, once."""
    vocab = model.config.vocab_size
    first, second = torch.arange(3, 8) % vocab, torch.arange(11, 17) % vocab
    packed = model(
        input_ids=torch.cat([first, second])[None],
        position_ids=torch.cat([torch.arange(5), torch.arange(6)])[None],
        use_cache=False,
    ).logits
    alone = model(input_ids=second[None], position_ids=torch.arange(6)[None], use_cache=False).logits
    if not torch.allclose(packed[0, 5:], alone[0], atol=1e-4, rtol=1e-3):
        raise UserError(
            f"model.name_or_path: {name} lets packed sequences attend to each other (it does not "
            "isolate them by position_ids); set data.packing: false"
        )


class Window:
    """Training loss and throughput since the last log line."""

    def __init__(self, first_step: int, flops_per_token: float, world: int, peak_flops: float | None):
        self.first_step = first_step  # where this process started (after a resume, not 0)
        self.flops_per_token, self.world, self.peak_flops = flops_per_token, world, peak_flops
        self.started = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.tokens, self.real_tokens, self.steps = 0.0, 0, 0, 0
        self.since = time.perf_counter()

    def add(self, loss_sum: float, tokens: int, real_tokens: int) -> None:
        self.loss_sum += loss_sum
        self.tokens += tokens
        self.real_tokens += real_tokens
        self.steps += 1

    def flush(self, step: int, epoch: int, lr: float, total_steps: int, rank: int) -> dict:
        now = time.perf_counter()
        (real_tokens,) = all_reduce([float(self.real_tokens)])  # real (non-padding) input tokens of all ranks
        (peak,) = all_reduce([peak_memory_gb()], op=dist.ReduceOp.MAX)  # the worker closest to running out
        elapsed = max(now - self.since, 1e-9)
        tokens_per_s = real_tokens / elapsed
        metrics = {
            "step": step,
            "epoch": epoch,
            "loss": self.loss_sum / max(self.tokens, 1),
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed / max(self.steps, 1),
            "mfu": (tokens_per_s * self.flops_per_token / (self.peak_flops * self.world) if self.peak_flops else None),
            "peak_memory_gb": peak,
            "world_size": self.world,
        }
        if rank == 0:
            eta_s = (now - self.started) / max(step - self.first_step, 1) * (total_steps - step)
            say(
                f"step {step}/{total_steps} epoch {epoch + 1} loss {metrics['loss']:.4f} lr {lr:.2e} "
                f"tokens/s {metrics['tokens_per_s']:.0f} eta {_duration(eta_s)}"
            )
        self._reset()
        return metrics


# Dense 16-bit tensor-core peaks (FLOP/s) by device name. fp32 has no single peak (TF32 or not), so none is used.
GPU_PEAK_FLOPS = {
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,
    "T4": 65e12,
    "4090": 165e12,
    "3090": 71e12,
}


def peak_flops(device, dtype: str) -> float | None:
    """The device's peak for this precision, or None when unknown (CPU included): MFU is then reported as
    unavailable rather than guessed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS.items():
        if key in name:
            return flops if dtype in ("bf16", "fp16") else None
    return None


def reset_peak_memory() -> None:
    """Start measuring this worker's peak memory here: what training holds, not loading the model (which on CPU
    briefly holds the whole model before ZeRO-3 partitions it), as `zeray plan` estimates it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: the process's resident high-water mark (VmHWM) back to its current size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # elsewhere the peak counts from the process's start
        pass


def peak_memory_gb() -> float:
    """Peak memory of this worker since reset_peak_memory(): the GPU's allocations, or on CPU the process's
    resident high-water mark."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1024**3
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024**2  # KiB
    except (OSError, StopIteration):
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS reports bytes
        return maxrss / 1024**3 if sys.platform == "darwin" else maxrss / 1024**2


say = worker_line  # a progress line to the driver's console


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
