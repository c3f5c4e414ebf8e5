"""Frozen features and what is built on them: a backbone's pooled tokens (the class token, the patch
tokens' mean, or both; of the last block or several), DINO's weighted k-NN on them, and DINOv2's
linear probe, whose head goes back on the backbone as an ordinary model.

- k-NN (Caron et al. 2021, DINO's `eval_knn.py`): cosine similarity of L2-normalised features; each of
  the k most similar training images votes for its class with weight exp(similarity / T), T = 0.07.
- Linear probe: a sweep chosen on a validation split and reported on the test split, as DINOv2's
  `eval/linear.py` does, of logistic regressions as CLIP's linear probes (Radford et al. 2021):
  L-BFGS on cross-entropy plus an L2 penalty, the penalty's strength swept. DINOv2 sweeps SGD's
  learning rate on 1.2 M images, where no head overfits; on a few thousand images the penalty is
  what decides, and this objective is scikit-learn's, to which the probe answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import ConfigError, DataError
from .model import VisionTransformer
from .runtime import autocast

# Which pooled tokens: vitlab's classifier of each (the class token, the patches' mean, both)
TOKENS = {"cls": "token", "mean": "gap", "both": "token_gap"}
KNN_K = (10, 20, 100, 200)  # DINO's
KNN_TEMPERATURE = 0.07
# L2 strengths of the probe's sweep (1 / scikit-learn's C): 1e-3 to 1e3, scikit-learn's default 1
PROBE_STRENGTHS = tuple(10.0**k for k in range(-3, 4))


def feature_config(config: ModelConfig, tokens: str, blocks: int) -> ModelConfig:
    """`config` pooled as `tokens` says over the last `blocks` blocks, with no pre-logits layer: the
    model whose pre-logits vector is the feature and whose head a probe trains."""
    if tokens not in TOKENS:
        raise ConfigError(f"--tokens {tokens!r}: choose {', '.join(TOKENS)}")
    if tokens != "mean" and not config.has_class_token:
        raise ConfigError(f"--tokens {tokens}: the model has no class token; use --tokens mean")
    if not 1 <= blocks <= config.depth:
        raise ConfigError(f"--blocks {blocks}: the model has {config.depth} blocks")
    if config.distilled or config.final_norm != "before_pool":
        raise ConfigError(
            "vitlab's features are the normed tokens of the last blocks, pooled; this model "
            "(distilled, or normed after pooling) reads its head otherwise"
        )
    return config.replace(
        classifier=TOKENS[tokens],
        class_token=config.has_class_token,
        pool_blocks=blocks,
        representation_size=None,
    )


def feature_model(backbone: VisionTransformer, config: ModelConfig) -> VisionTransformer:
    """`backbone`'s blocks in a model of `config` (a `feature_config` of it), in eval mode on the
    backbone's device: its head zero, for a probe to train; the backbone's own head and pooling
    layers left out."""
    model = VisionTransformer(config)
    heads = ("head.", "head_dist.", "pre_logits.", "attn_pool.")
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith(heads)}
    missing, _ = model.load_state_dict(state, strict=False)
    assert all(k.startswith("head.") for k in missing), missing  # only the new head
    return model.to(next(backbone.parameters()).device).eval()


@torch.no_grad()
def embed(model: VisionTransformer, images: torch.Tensor, precision: str) -> torch.Tensor:
    """The features (B, pooled_width) of a batch of preprocessed images, in float32."""
    with autocast(images.device, precision):
        return model(images, pre_logits=True).float()


# ---------------------------------------------------------------------------------------------
# k-NN


@torch.no_grad()
def knn_accuracy(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    num_classes: int,
    ks: tuple[int, ...] = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 256,
) -> dict[int, tuple[float, float]]:
    """DINO's weighted k-NN: for each k, (top-1, top-5) accuracy of `test` (features, labels)
    classified by the k most similar of `train` (features, labels)."""
    if max(ks) > len(train[0]):
        raise DataError(f"k {max(ks)} is more than the {len(train[0])} training images")
    # In float64: near the k-th neighbour and between two classes' votes, float32's rounding can
    # decide; the formula's own answer does not depend on it
    bank, bank_labels = F.normalize(train[0].double(), dim=1).T, train[1]  # (D, N)
    queries, labels = F.normalize(test[0].double(), dim=1), test[1]
    correct = {k: torch.zeros(2) for k in ks}
    for start in range(0, len(queries), chunk):
        similarity = queries[start : start + chunk] @ bank  # (b, N)
        top, index = similarity.topk(max(ks), dim=1)  # sorted, most similar first
        votes = F.one_hot(bank_labels[index], num_classes).double()  # (b, K, classes)
        weights = (top / temperature).exp()[..., None]
        truth = labels[start : start + chunk, None]
        for k in ks:
            ranked = (votes[:, :k] * weights[:, :k]).sum(dim=1).argsort(dim=1, descending=True)
            hits = ranked[:, : min(5, k)] == truth
            correct[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
    return {k: (c[0].item() / len(queries), c[1].item() / len(queries)) for k, c in correct.items()}


# ---------------------------------------------------------------------------------------------
# Linear probe


@dataclass(frozen=True)
class ProbeResult:
    strength: float  # the L2 strength chosen on the validation split (scikit-learn's C = 1 / it)
    val_accuracy: dict[float, float]  # every strength's
    weight: torch.Tensor  # (classes, features): the head, fitted on all the labelled features
    bias: torch.Tensor  # (classes,)


def train_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    num_classes: int,
    strengths: tuple[float, ...] = PROBE_STRENGTHS,
    max_iter: int = 1000,
) -> ProbeResult:
    """A linear probe as CLIP's and scikit-learn's logistic regression: multinomial cross-entropy
    plus strength / 2 * |W|^2 (the bias free), minimised by L-BFGS; one head per strength of the
    grid (strongest first, each starting from the last), the best on `val` chosen, then fitted
    again, from there, on `train` and `val` together: all the labelled features there are."""
    weight, bias, accuracy, fitted = None, None, {}, {}
    for strength in sorted(strengths, reverse=True):
        weight, bias = _logistic_regression(
            train, num_classes, strength=strength, start=(weight, bias), max_iter=max_iter
        )
        predicted = (val[0].float() @ weight.T + bias).argmax(dim=1)
        accuracy[strength], fitted[strength] = (
            (predicted == val[1]).float().mean().item(),
            (weight, bias),
        )
    best = max(sorted(accuracy, reverse=True), key=accuracy.get)  # ties: the stronger
    everything = torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]])
    weight, bias = _logistic_regression(
        everything, num_classes, strength=best, start=fitted[best], max_iter=max_iter
    )
    return ProbeResult(best, dict(sorted(accuracy.items())), weight, bias)


def _logistic_regression(
    data: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    strength: float,
    start: tuple[torch.Tensor | None, torch.Tensor | None],
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over (W, b) of sum_i CE(x_i W^T + b, y_i) + strength / 2 |W|^2, by L-BFGS with a
    strong-Wolfe line search, to scikit-learn's tolerance (1e-4 on the gradient of the objective
    divided by n, as scikit-learn scales it): ((classes, features), (classes,))."""
    features, labels = data[0].float(), data[1]
    n, width = features.shape
    # Centred features, the bias taking up the mean: the same optimum (the bias is not penalised),
    # far better conditioned (a CIFAR probe's L-BFGS: 226 evaluations instead of 615)
    mean = features.mean(dim=0)
    features = features - mean
    weight = torch.zeros(num_classes, width) if start[0] is None else start[0]
    bias = torch.zeros(num_classes) if start[1] is None else start[1] + start[0] @ mean
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-4,
        tolerance_change=1e-9,
        # scikit-learn's and scipy's 10 pairs took 648 evaluations for a CIFAR probe at strength 10,
        # 100 pairs 370 to the same objective (7,690 parameters: the history costs nothing)
        history_size=100,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels)
        loss = loss + strength / (2 * n) * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    weight = weight.detach()
    return weight, bias.detach() - weight @ mean
