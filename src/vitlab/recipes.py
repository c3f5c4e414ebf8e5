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

# ---------------------------------------------------------------------------------------------
# Fine-tuning each family from its pretrained weights, as its authors published it for ImageNet-1k
# (1,281,167 images: num_steps and warmup_steps are their epochs at their batch). For another
# dataset, keep the learning rate, layer decay and regularisation; set --num_steps to the same
# epochs of it, and scale the learning rate with the batch as each says. Augmentations vitlab lacks
# (DeiT's repeated augmentation, timm's RandAugment magnitude noise) are left out; RandAugment
# "rand-m9-mstd0.5" is --randaugment 2,9. Accuracy: the authors', not measured by vitlab. Run, e.g.:
# `vitlab train --recipe finetune-mae --name mae-pets --dataset imagefolder --data_dir DIR
# --num_steps 2000`.
_IMAGENET_RECIPE = dict(
    dataset="imagefolder",
    pretrained_dir="auto",  # the variant's timm repository (`vitlab download --list`)
    optimizer="adamw",
    decay_type="cosine",
    max_grad_norm=0.0,  # none of these clips gradients
    eval_every=1000,
)
# The DeiT family's regularisation (facebookresearch/deit main.py defaults): mixup 0.8, CutMix 1.0,
# label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1; MAE's fine-tuning takes the same
# (mae/main_finetune.py, FINETUNE.md).
_DEIT_AUGMENTATION = dict(mixup=0.8, cutmix=1.0, label_smoothing=0.1, randaugment="2,9")

# DeiT III ViT-B, fine-tuned at 224 px (facebookresearch/deit README_revenge.md, "finetuning for
# ViT-B, L and H"): AdamW, batch 512 (64 on each of 8 GPUs), lr 1e-5 unscaled (its --unscale-lr),
# weight decay 0.1, drop path 0.2 (L: 0.45), 20 epochs, 5 of warmup, mixup 0.8, CutMix 1.0, label
# smoothing 0.1, RandAugment, no erasing. 83.8% on ImageNet-1k for the ImageNet-1k ViT-B (its
# README's table).
_DEIT3 = dict(
    _IMAGENET_RECIPE,
    **_DEIT_AUGMENTATION,
    img_size=224,
    train_batch_size=512,
    learning_rate=1e-5,
    weight_decay=0.1,
    drop_path_rate=0.2,
    num_steps=50_040,
    warmup_steps=12_510,
)

# CLIP ViT-B/16, OpenAI's weights (FT-CLIP, Dong et al. 2022, "CLIP Itself is a Strong
# Fine-tuner": LightDXY/FT-CLIP scripts/bash_fine_Openai_CLIP_P16.sh): AdamW, batch 2048
# (256 on each of 8 GPUs), lr 6e-4 unscaled, layer decay 0.6, weight decay 0.05, no drop
# path, no mixup or CutMix, EMA 0.9998, 50 epochs, 10 of warmup, CLIP's mean and std;
# 85.7% on ImageNet-1k (its title). ViT-L/14: lr 4e-4, layer decay 0.65, 30 epochs, 5 of
# warmup. OpenCLIP's towers: --model_type openclip-B/16.
_FT_CLIP = dict(
    _IMAGENET_RECIPE,
    img_size=224,
    train_batch_size=2048,
    learning_rate=6e-4,
    layer_decay=0.6,
    weight_decay=0.05,
    ema=0.9998,
    num_steps=31_250,
    warmup_steps=6_250,
)

RECIPES.update(
    {
        # MAE ViT-B/16 (facebookresearch/mae FINETUNE.md): batch 1024, blr 5e-4 scaled by batch /
        # 256 (lr 2e-3), layer decay 0.65, weight decay 0.05, drop path 0.1, random erasing 0.25,
        # 100 epochs, 5 of warmup (main_finetune.py's default); 83.6% on ImageNet-1k (mean of 4
        # seeds). L/16 and H/14: blr 1e-3, layer decay 0.75, drop path 0.2 and 0.3, 50 epochs. The
        # timm file is MAE's pretrained encoder, which has no head: it fine-tunes with its class
        # token (MAE's --cls_token, which "performs similarly" to its average pooling).
        "finetune-mae": dict(
            _IMAGENET_RECIPE,
            **_DEIT_AUGMENTATION,
            model_type="mae-B/16",
            img_size=224,
            train_batch_size=1024,
            learning_rate=2e-3,
            layer_decay=0.65,
            weight_decay=0.05,
            drop_path_rate=0.1,
            random_erasing=0.25,
            num_steps=125_100,
            warmup_steps=6_255,
        ),
        # DeiT-B, fine-tuned from 224 to 384 px (facebookresearch/deit README_deit.md): AdamW,
        # batch 512 (32 on each of 16 GPUs), lr 5e-6 (DeiT scales lr by batch / 512), weight decay
        # 1e-8, 30 epochs, 5 of warmup, drop path 0.1, random erasing 0.25, EMA 0.99996 (main.py's
        # defaults); its minimum lr 5e-6 holds the rate constant after warmup, where vitlab decays
        # it. 82.9% on ImageNet-1k at 384 px (its README's table). Distilled variants
        # fine-tune the same way (--model_type deit-distilled-B/16).
        "finetune-deit": dict(
            _IMAGENET_RECIPE,
            **_DEIT_AUGMENTATION,
            model_type="deit-B/16",
            img_size=384,
            train_batch_size=512,
            learning_rate=5e-6,
            weight_decay=1e-8,
            drop_path_rate=0.1,
            random_erasing=0.25,
            ema=0.99996,
            num_steps=75_060,
            warmup_steps=12_510,
        ),
        "finetune-deit3": dict(_DEIT3, model_type="deit3-B/16"),  # above
        # DINOv2 publishes no fine-tuning recipe: its authors recommend frozen features, e.g. "a
        # linear layer applied on the class token and the average of the patch tokens" (vitlab's
        # token_gap; for this probe: --freeze all-but-head); fine-tuning is "technically possible
        # ... for small gains (we measured +2% on ImageNet-1k classification)", best kept "as a
        # very last step" (facebookresearch/dinov2 MODEL_CARD.md). The nearest published
        # fine-tuning of a layer-scaled ViT is DeiT III's (above), here at DINOv2's 224 px (16 x
        # 16 patches of 14). Not measured by anyone for DINOv2.
        "finetune-dinov2": dict(_DEIT3, model_type="dinov2-B/14"),
        "finetune-clip": dict(_FT_CLIP, model_type="clip-B/16"),  # FT-CLIP, above
        # SigLIP's authors publish no fine-tuning recipe for classification (big_vision's SigLIP
        # configs train the image-text pair). The nearest published one is FT-CLIP's for CLIP's
        # image towers (above), the same kind of image-text pretraining. Not measured by anyone
        # for SigLIP.
        "finetune-siglip": dict(_FT_CLIP, model_type="siglip-B/16"),
    }
)
