"""Evaluate a (defended) classifier under an attack and a threat model.

    python evaluate.py dataset=fashion_mnist victim=classifier_a defense=none attack=pgd
    python evaluate.py -m attack=fgsm,pgd,deepfool        # a sweep; `make tables` aggregates it
    python evaluate.py audit=true                         # gradient-masking audit
    python evaluate.py -m dataset.shard=0/4,1/4,2/4,3/4   # one evaluation in 4 shards; `make tables` merges them

In a multirun a failing job does not stop the others: the sweep ends with the list of failed jobs, exit status 1;
rerunning it with the same hydra.sweep.dir=… skips the jobs already done (evaluation/multirun.py, eval.skip_done).

From Python: ``from evaluate import evaluate; evaluate(defended_model, datamodule, attack)``.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from evaluation.cli import guard_command_line, report_user_errors
from evaluation.loop import evaluate  # noqa: F401  (the notebook API)
from evaluation.runner import run_evaluation


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    result = run_evaluation(cfg)
    if cfg.audit or cfg.get("detection") or cfg.get("certify"):
        return None  # each prints its own summary and writes its own files
    clean = "not scored" if result["clean_acc"] is None else f"{result['clean_acc']:.2f}%"
    print(
        f"{result['dataset']} | {result['victim']} | {result['defense']} | {result['attack']} ({result['threat']}): "
        f"clean {clean}  robust {result['robust_acc']:.2f}% "
        f"(worst-of-{result['n_draws']} {result['robust_acc_worst']:.2f}%)  n={result['n_images']}  "
        f"{result['images_per_s']:.1f} img/s"
    )
    return result["robust_acc"]


if __name__ == "__main__":
    guard_command_line()
    main()
