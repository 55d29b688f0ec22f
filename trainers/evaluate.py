"""`zeray eval`: loss, perplexity and next-token accuracy of a Hugging Face model on a config's test split.

The same Ray Data pipeline (tokenized with the evaluated model's own tokenizer) feeds a TorchTrainer with the run's
workers, which share the split as they do during training (the same code): the numbers do not depend on how many.
"""

import json
import os
import tempfile

import ray
import ray.train
import torch
from ray.data import ExecutionOptions
from ray.train import DataConfig, ScalingConfig
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchTrainer

from cluster.local import fit_or_explain, placement_timeout
from cluster.resources import worker_resources
from core.errors import UserError
from core.fs import resolve
from pipelines.dataset import build_splits, load_tokenizer, without_progress_bars
from pipelines.prep import load_prepared
from trainers.lora import holds_adapters


def eval_loop_per_worker(config: dict) -> None:
    from transformers import AutoModelForCausalLM

    from trainers.loop import check_packing_isolation, evaluate
    from trainers.loss import TokenLoss, exact_for

    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    attn = config["attn_implementation"]
    model = AutoModelForCausalLM.from_pretrained(
        config["model_dir"],
        trust_remote_code=config["trust_remote_code"],
        use_safetensors=True,
        attn_implementation=None if attn == "auto" else attn,
    ).to(device)
    model.eval()
    if config["packing"]:
        check_packing_isolation(model, config["model_dir"])
    loss_of = TokenLoss(model, chunked=config["chunked_loss"] and exact_for(model))
    context = ray.train.get_context()
    rank = context.get_world_rank()
    metrics = evaluate(
        model,
        loss_of,
        "test",
        batch_size=config["batch_size"],
        pad_id=config["pad_token_id"],
        device=device,
        packed=config["packing"],
        rank=rank,
        world=context.get_world_size(),
    )
    # Ray Train returns the metrics that came with a checkpoint: rank 0 files the result as one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            with open(os.path.join(tmp, "eval.json"), "w") as f:
                json.dump(metrics, f)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def evaluate_model(cfg, model_dir: str) -> dict:
    if not os.path.isfile(os.path.join(model_dir, "config.json")) and not holds_adapters(model_dir):
        raise UserError(
            f"--model {model_dir} is not a Hugging Face model directory (no config.json, nor adapter_config.json)"
        )
    t = cfg.train
    storage_fs, storage_path = resolve(cfg.storage, "storage")
    gpu, per_worker = worker_resources(cfg)
    if cfg.data.prepared:  # the test split `zeray prep` wrote, as `zeray train` reads it
        datasets, report = load_prepared(cfg.data.prepared, splits=("test",))
        test, packing = datasets["test"], report["packing"]
    else:
        test = build_splits(
            cfg.data, model_dir, cfg.model.trust_remote_code, splits=("test",), wait_s=placement_timeout(cfg.cluster)
        ).test
        packing = cfg.data.packing
    trainer = TorchTrainer(
        eval_loop_per_worker,
        train_loop_config={
            "model_dir": model_dir,
            "trust_remote_code": cfg.model.trust_remote_code,
            "attn_implementation": cfg.model.attn_implementation,
            "chunked_loss": t.chunked_loss,
            "batch_size": t.micro_batch_size,
            "cpus_per_worker": t.cpus_per_worker,
            "pad_token_id": load_tokenizer(model_dir, cfg.model.trust_remote_code).pad_token_id,
            "packing": packing,
        },
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=gpu, resources_per_worker=per_worker),
        datasets=without_progress_bars({"test": test}),
        # every worker reads the whole split in the same order and scores its share (see trainers.loop.evaluate)
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        run_config=TrainRunConfig(name=f"{cfg.name}-eval", storage_path=storage_path, storage_filesystem=storage_fs),
    )
    elastic_min = (t.min_workers, per_worker) if t.elastic else None
    metrics = fit_or_explain(trainer, placement_timeout(cfg.cluster), elastic_min=elastic_min).metrics
    return {
        "test_loss": metrics["eval_loss"],
        "test_perplexity": metrics["eval_perplexity"],
        "test_token_accuracy": metrics["eval_token_accuracy"],
        "test_tokens": metrics["eval_tokens"],
        "model": model_dir,
    }
