"""Training actions: readiness, the Train click (a background job), runs, and which model answers.

A mixin of Studio (webapp/actions.py): it uses ``self.catalogue``, ``self.db`` and ``self._require``.
"""
from __future__ import annotations

from pathlib import Path

from dataset_tools import assign_splits
from training import active, jobs

from .common import MIN_PHOTOS_PER_PRODUCT, StudioError


class TrainingActions:
    # ------------------------------------------------------------------------------------ train
    def training_readiness(self) -> tuple[bool, str]:
        products = self.catalogue.products()
        ready = [p for p in products if p["images"] >= MIN_PHOTOS_PER_PRODUCT]
        if len(ready) < 2:
            short = ", ".join(f"{p['name']} ({p['images']})" for p in products if p["images"] < MIN_PHOTOS_PER_PRODUCT)
            return False, (f"Training needs at least 2 products with {MIN_PHOTOS_PER_PRODUCT}+ photos each; "
                           f"you have {len(ready)}." + (f" Too few photos: {short}." if short else ""))
        return True, f"Ready: {len(ready)} products, {sum(p['images'] for p in ready)} photos."

    def start_training(self, backbone: str = "efficientnet_lite0", max_minutes: float | None = None, cat_num: int = 4,
                       input_size: int | None = None, exclude_products=(), recipe: str = "progressive", **paper_args) -> dict:
        """One click: the progressive job (training/progressive.py), which makes each stage active only if it is
        better. ``recipe='paper'`` runs the paper's single NTS-Net run instead (``paper_args``: epochs, lr ...)."""
        self._require("training")
        ok, why = self.training_readiness()
        if not ok:
            raise StudioError(why)
        from ntsnet.backbones import backbone_spec

        try:
            spec = backbone_spec(backbone)
        except ValueError as exc:
            raise StudioError(str(exc)) from None
        if recipe not in ("progressive", "paper"):
            raise StudioError(f"unknown recipe {recipe!r}")
        if paper_args and recipe != "paper":
            raise StudioError(f"{', '.join(sorted(paper_args))}: settings of the paper's recipe (recipe='paper')")
        assign_splits(self.catalogue)
        args = dict(backbone=backbone, pretrained=spec.has_pretrained, max_minutes=float(max_minutes) if max_minutes else None,
                    cat_num=int(cat_num), input_size=int(input_size) if input_size else None,
                    exclude_products=",".join(exclude_products) or None)
        if recipe == "paper":
            args.update(recipe="paper", proposal_num=max(6, int(cat_num)), **paper_args)
            if input_size and "part_size" not in paper_args:
                args["part_size"] = max(32, int(input_size) // 2)
        try:
            return jobs.start(self.db, **args)
        except jobs.JobError as exc:
            raise StudioError(str(exc)) from None

    def current_run(self) -> dict | None:
        """The running job, else the most recent run."""
        active = jobs.active_job(self.db)
        if active:
            return active
        runs = jobs.list_runs(self.db)
        return runs[0] if runs else None

    def cancel_training(self) -> str:
        self._require("training")
        run = jobs.active_job(self.db)
        if not run:
            return "No training is running."
        st = jobs.cancel(run["run_dir"])
        return f"{st['name']}: {st['state']}."

    def runs(self) -> list[dict]:
        return jobs.list_runs(self.db)

    @staticmethod
    def describe_run(run: dict | None) -> str:
        if not run:
            return "No training run yet."
        p = run["progress"]
        lines = [f"**{run['name']}** — {run['state']}"]
        if p.get("recipe") == "progressive":
            stage = p.get("stage") or "starting"
            order = p.get("stages") or []
            if stage in order:
                lines.append(f"stage {order.index(stage) + 1}/{len(order)}: **{stage}**"
                             + (f", about {p['stage_seconds_left'] / 60:.1f} min left in this stage" if p.get("stage_seconds_left") else ""))
            elif run["state"] == "running":
                lines.append(f"{stage} …")
            if p.get("instant_val_acc") is not None:
                lines.append(f"instant model: {p['instant_val_acc']:.1%} on {p.get('val_images', '?')} validation photos")
            for r in p.get("results", []):
                mark = "became the active model" if r["active"] else "not better: the previous model kept answering"
                size = f" at {r['input_size']} px" if r.get("input_size") else ""
                if r.get("answer") == "all-heads":
                    size += ", all heads answering"
                if r["stage"] == "refit":  # trained on the validation photos too: only the test photos can tell
                    other = r["compared_with"]
                    lines.append(f"refit of {r['refit_of']} on training + validation photos: {r['test_acc']:.1%} on {r['test_n']} test "
                                 f"photos ({other['stage']}: {other['test_acc']:.1%}){size} — {mark}")
                else:
                    lines.append(f"{r['stage']}: {r['val_acc']:.1%}{size} — {mark}")
        elif p.get("epoch"):
            lines.append(f"epoch {p['epoch']}/{p.get('epochs')}, step {p.get('step', '-')}/{p.get('steps', '-')}")
        if p.get("loss"):
            lines.append("loss " + ", ".join(f"{k} {v:.3f}" for k, v in p["loss"].items()))
        if p.get("train_acc") is not None:
            lines.append(f"train accuracy {p['train_acc']:.1%}")
        if run.get("best_val_acc") is not None:
            lines.append(f"best validation accuracy {run['best_val_acc']:.1%}")
        if p.get("eta_seconds") and run["state"] == "running":
            lines.append(f"about {p['eta_seconds'] / 60:.1f} min left in the job (measured speed)")
        if p.get("device"):
            lines.append(f"{p['device']}, {p.get('precision')}, {p.get('images_per_s', 0):.1f} images/s")
        if run["state"] in ("failed", "interrupted") and run.get("log_tail"):
            lines.append("last log line: " + run["log_tail"].strip().splitlines()[-1][-300:])
        return "  \n".join(lines)

    # ----------------------------------------------------------------------------- active model
    def active_checkpoint(self) -> str | None:
        path = active.read(self.db).get("checkpoint")
        return path if path and (path.startswith("hf://") or Path(path).exists()) else None

    def active_model_name(self) -> str | None:
        path = self.active_checkpoint()
        return active.short_name(path) if path else None

    def set_active_model(self, checkpoint: str, pin: bool = False) -> str:
        """Make a checkpoint (a run name, a file, or hf://user/repo) the model that answers. ``pin``: keep it
        active while training jobs find better models (they are listed, not switched to)."""
        self._require("training")
        return self._activate(checkpoint, pin)

    def _activate(self, checkpoint: str, pin: bool) -> str:
        run_dir = jobs.runs_root(self.db) / checkpoint
        if (run_dir / "best.safetensors").exists():
            checkpoint = str(run_dir / "best.safetensors")
        predictor = self._load(checkpoint)
        active.write(self.db, str(checkpoint), pinned=bool(pin), name=active.short_name(checkpoint), chosen_by="person")
        with self._lock:
            self._predictor, self._predictor_path = predictor, str(checkpoint)
        return (f"Active model: {active.short_name(checkpoint)} ({len(predictor.class_names)} products)"
                + (", pinned: training will not replace it." if pin else "."))

    def _load(self, checkpoint: str):
        from ntsnet import CheckpointError, Predictor

        try:
            if str(checkpoint).startswith("hf://"):
                predictor = Predictor.from_pretrained(str(checkpoint)[5:], backend=self.backend, precision=self.precision)
            else:
                predictor = Predictor.from_checkpoint(checkpoint, backend=self.backend, precision=self.precision)
        except (CheckpointError, OSError, ValueError) as exc:
            raise StudioError(f"Cannot load model {checkpoint}: {exc}") from None
        predictor.live_threads = self.live_threads
        return predictor

    def predictor(self):
        path = self.active_checkpoint()
        if path is None:
            return None
        with self._lock:
            if self._predictor is None or self._predictor_path != path:
                self._predictor, self._predictor_path = self._load(path), path
            return self._predictor

