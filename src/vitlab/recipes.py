"""Named training recipes: starting values for `vitlab train --recipe NAME`, overridden by a
config file and by flags. Each says how to run it and what it reaches, as measured."""

from __future__ import annotations

RECIPES: dict[str, dict] = {
    # The tutorial's published fine-tuning run: ViT-B/16 from the ImageNet-21k checkpoint, 500 steps
    # of 512 images at 224 px. Run: `vitlab train --recipe finetune-cifar10 --name b16-cifar10`.
    # Reaches (published by the tutorial on GPUs, not yet measured by vitlab): 98.6% on the CIFAR-10
    # test set; the tutorial's own headline, 100 steps of batch 16, gave 95.66%.
    "finetune-cifar10": dict(
        dataset="cifar10",
        model_type="ViT-B_16",
        pretrained_dir="auto",
        img_size=224,
        train_batch_size=512,
        learning_rate=3e-2,
        num_steps=500,
        warmup_steps=100,
        decay_type="cosine",
        eval_every=100,
    ),
    # ViT from scratch on CIFAR-10 on a laptop CPU: patch 4 at 32 px (64 tokens, average pooling),
    # width 192, depth 6, 6 heads, MLP 384, exact GELU, sine-cosine position init, mimetic attention
    # init, half the patches dropped in training; Muon for the blocks' matrices and AdamW for the
    # rest, bf16 where native, crop and flip, label smoothing. Run: `vitlab train --recipe
    # scratch-cifar10-cpu --name scratch --dataset imagefolder --data_dir DIR` (or
    # --dataset cifar10). Measured on a 2-core AMD EPYC CPU (no GPU), 45,000 CIFAR-10 training images, 5,000 held
    # out: benchmarks/RESULTS.md (`benchmarks/cifar10_cpu.py DIR`, a 28-minute budget).
    "scratch-cifar10-cpu": dict(
        dataset="cifar10",
        model_type="Ti/16",
        pretrained_dir="none",
        img_size=32,
        patch_size=4,
        depth=6,
        num_heads=6,
        mlp_dim=384,
        dropout_rate=0.0,
        classifier="gap",
        gelu="exact",
        pos_embed_init="sincos2d",
        patch_drop_rate=0.5,
        attention_init="mimetic",
        train_batch_size=256,
        optimizer="muon",
        learning_rate=2e-3,
        weight_decay=0.05,
        adam_betas=(0.9, 0.99),
        num_steps=3200,
        warmup_steps=200,
        decay_type="cosine",
        label_smoothing=0.1,
        augment="pad_crop",
        hflip=True,
        precision="auto",
        val_split=0.1,
        eval_every=640,
        eval_batch_size=500,
        max_grad_norm=1.0,
    ),
}
