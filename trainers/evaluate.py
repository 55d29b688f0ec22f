"""`zeray eval`: loss, perplexity and next-token accuracy of a Hugging Face model on a config's test split.

The same Ray Data pipeline (tokenized with the evaluated model's own tokenizer) feeds a one-worker TorchTrainer
that scores the whole split (the same code that evaluates during training).
"""

import json
import os
import tempfile

import ray
import ray.train
import torch
from ray.train import RunConfig as TrainRunConfig
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from cluster.local import fit_or_explain, placement_timeout
from pipelines.dataset import build_splits, load_tokenizer
from trainers.lora import holds_adapters
from trainers.run import worker_resources
from zeray.errors import UserError
from zeray.fs import resolve


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
    metrics = evaluate(model, loss_of, "test", config["batch_size"], config["pad_token_id"], device, config["packing"])
    # Ray Train returns the metrics that came with a checkpoint: rank 0 files the result as one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
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
    splits = build_splits(
        cfg.data, model_dir, cfg.model.trust_remote_code, splits=("test",), wait_s=placement_timeout(cfg.cluster)
    )
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
            "packing": cfg.data.packing,
        },
        # one worker scores the whole split: no sharding, so no row is dropped and the number is exact
        scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu, resources_per_worker=per_worker),
        datasets={"test": splits.test},
        run_config=TrainRunConfig(name=f"{cfg.name}-eval", storage_path=storage_path, storage_filesystem=storage_fs),
    )
    metrics = fit_or_explain(trainer, placement_timeout(cfg.cluster)).metrics
    return {
        "test_loss": metrics["eval_loss"],
        "test_perplexity": metrics["eval_perplexity"],
        "test_token_accuracy": metrics["eval_token_accuracy"],
        "test_tokens": metrics["eval_tokens"],
        "model": model_dir,
    }
