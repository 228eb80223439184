"""How the job judges a model on its validation photos: every answer it can give from one forward pass per batch,
the test size and answer it will give, and the comparison with a model of other products.

Every forward pass runs on the model's own device (a GPU when the model is on one), in batches.
"""
from __future__ import annotations

import numpy as np
import torch

from ntsnet import NTSConfig, answer_probabilities, create_model
from ntsnet.config import ANSWERS
from ntsnet.device import device_of, inference_batch, to_device_of
from ntsnet.images import to_input_tensor


def answers_of(model) -> tuple[str, ...]:
    """The answers a model can give (see answer_probabilities): a classifier has only its one head."""
    return ANSWERS if model.config.model == "ntsnet" and model.config.cat_num else ("scrutinizer",)


@torch.inference_mode()
def answer_predictions(model, arrays, batch: int = 16) -> dict[str, tuple[list[int], list[float]]]:
    """For every answer the model can give, from one forward pass per batch: each photo's predicted class and its
    probability."""
    model.eval()
    size, answers = model.config.input_size, answers_of(model)
    device = device_of(model)
    batch = inference_batch(device, batch)
    kept = {a: [] for a in answers}
    for start in range(0, len(arrays), batch):
        # resized on the model's device (a GPU gets uint8 photos); read back once, after the last batch
        x = to_device_of(model, to_input_tensor(arrays[start:start + batch], size, model.mean, model.std, device=device))
        logits = model(x, num_parts=model.config.cat_num if model.config.model == "ntsnet" else None)
        for a in answers:
            kept[a].append(answer_probabilities(logits, a).float().max(1))
    out = {a: ([], []) for a in answers}
    for a, parts in kept.items():
        if parts:
            conf, pred = torch.cat([c for c, _ in parts]).cpu(), torch.cat([p for _, p in parts]).cpu()
            out[a] = (pred.tolist(), conf.tolist())
    return out


def evaluate_answers(model, arrays, labels, batch: int = 16) -> dict[str, tuple[float, list[float]]]:
    """For every answer the model can give: top-1 accuracy on the photos (an exact fraction) and each photo's max
    probability (for the unknown threshold)."""
    return {a: ((sum(p == y for p, y in zip(preds, labels)) / len(labels)) if labels else float("nan"), scores)
            for a, (preds, scores) in answer_predictions(model, arrays, batch).items()}


def evaluate_model(model, arrays, labels, batch: int = 16) -> tuple[float, list[float]]:
    """Top-1 accuracy of the model's own answer and each photo's max probability."""
    answers = evaluate_answers(model, arrays, labels, batch)
    return answers.get(model.config.answer, answers["scrutinizer"])


def selection_accuracy(model, arrays, labels, batch: int = 16, evaluate=None) -> float:
    """What a stage is judged on while it trains: the top-1 accuracy of its best answer at the training size (the
    answer and size it will give are chosen after, by choose_test_size). ``evaluate``: evaluate_answers' stand-in."""
    return max(acc for acc, _ in (evaluate or evaluate_answers)(model, arrays, labels, batch).values())


def candidate_sizes(train_size: int) -> list[int]:
    """Input sizes worth trying at test time for a model trained at ``train_size``: random framing during training
    shows products larger than a plain resize of the whole photo does, so such a model often recognises best at a
    somewhat larger input (Touvron et al., "Fixing the train-test resolution discrepancy", 2019); 1, 8/7 and 9/7 of
    the training size, in multiples of 32."""
    return sorted({train_size, *(max(32, round(train_size * f / 32) * 32) for f in (8 / 7, 9 / 7))})


def at_input_size(model, size: int, answer: str | None = None):
    """The same weights answering at another input size (for NTS-Net the parts scale with it; its anchors are
    rebuilt for the new size, they are not weights), and with another ``answer`` if given; on the model's device."""
    cfg = model.config
    answer = answer or cfg.answer
    if size == cfg.input_size and answer == cfg.answer:
        return model
    part = max(32, round(size * cfg.part_size / cfg.input_size))
    resized = create_model(NTSConfig.from_dict({**cfg.to_dict(), "input_size": size, "part_size": part, "answer": answer}),
                           pretrained=False)
    resized.load_state_dict(model.state_dict())
    resized = resized.to(device_of(model))
    return (resized.to(memory_format=torch.channels_last) if device_of(model).type == "cpu" else resized).eval()


def best_answer(accuracies: dict) -> object:
    """The choice (a key of ``accuracies``: {condition: accuracy}) with the best mean accuracy over the conditions; on a
    tie the better clean accuracy, then the earlier key (choose_test_size lists smaller sizes and the Scrutinizer first)."""
    best, best_mean, best_clean = None, -1.0, -1.0
    for key, accs in accuracies.items():
        mean = float(np.mean(list(accs.values())))
        if mean > best_mean + 1e-9 or (abs(mean - best_mean) <= 1e-9 and accs["clean"] > best_clean + 1e-9):
            best, best_mean, best_clean = key, mean, accs["clean"]
    return best


def choose_test_size(model, arrays, labels, log=print, evaluate=None) -> tuple[torch.nn.Module, float, list[float], dict]:
    """The input size (of ``candidate_sizes``) and, for NTS-Net, the answer (the Scrutinizer alone or all heads) at
    which the model recognises the validation photos best, clean and in the store conditions of the evaluation
    (dark, blurry, low-res): ``best_answer`` decides. ``evaluate(model, arrays, labels)`` -> {answer: (accuracy,
    scores)}, one pass for all answers. Returns the model at that size and answer, its clean accuracy and scores,
    and every candidate's figures."""
    from .evaluate import CONDITIONS, apply_condition

    evaluate = evaluate or evaluate_answers
    conditioned = {c: [apply_condition(a, c) for a in arrays] for c in CONDITIONS}
    table, choices = {}, {}
    for size in candidate_sizes(model.config.input_size):
        candidate = at_input_size(model, size)
        results = {cond: evaluate(candidate, conditioned[cond], labels) for cond in CONDITIONS}
        for answer in answers_of(model):
            accs = {cond: results[cond][answer][0] for cond in CONDITIONS}
            key = str(size) if answer == "scrutinizer" else f"{size} {answer}"
            table[key] = {**{c: round(a, 5) for c, a in accs.items()}, "mean": round(float(np.mean(list(accs.values()))), 5)}
            choices[key] = (size, answer, accs, results["clean"][answer][1])
    best = best_answer({key: accs for key, (_, _, accs, _) in choices.items()})
    size, answer, accs, scores = choices[best]
    label = lambda key: key.replace(" ", " px, ", 1) if " " in key else key + " px"  # noqa: E731  "256 all-heads" -> "256 px, all-heads"
    log("test sizes: " + "; ".join(f"{label(k)} {r['clean']:.1%} clean, {r['mean']:.1%} mean of conditions" for k, r in table.items())
        + f" -> {label(best)}")
    return at_input_size(model, size, answer), accs["clean"], scores, table


def accuracy_by_name(predictor, arrays, labels, class_names) -> float:
    """Accuracy of another model (different products, maybe) on these photos, compared by product name."""
    if not arrays:
        return float("nan")
    correct = 0
    for start in range(0, len(arrays), 16):
        for p, y in zip(predictor.predict_batch(arrays[start:start + 16]), labels[start:start + 16]):
            correct += (p.best_guess or p.label) == class_names[y]
    return correct / len(arrays)
