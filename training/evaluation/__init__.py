"""Evaluation of a trained report generator, with the fair EHR A/B test and the trained-baseline protocol.

    launcher evaluate --checkpoint runs/tiny/checkpoints/final --data data/synth/curriculum_val.jsonl \
        --data-root data/synth --ehr both --out runs/tiny/eval
    launcher evaluate --checkpoint runs/curriculum/checkpoints/final \
        --baseline-checkpoint runs/image_only/checkpoints/final --data ... --out runs/curriculum/eval-vs-image-only

What is generated (greedy, batched, left padded; training/generate.py), for every study of the file (with --limit N,
a seeded random sample of N studies):

    arm       prompt                                          covers                       scored
    ehr_on    the Stage B prompt (Patient Data block filled)  studies with a Stage B row   Impression, CheXpert, ICD
    ehr_off   the same prompt with the block emptied          studies with a Stage B row   Impression, CheXpert, ICD
              (records.with_empty_ehr: same words, same image)
    stage_a   the Stage A prompt (image only)                 every study                  Impression, CheXpert

Every arm and model gets the same max_new_tokens (shared_max_new_tokens), so no arm's outputs are cut shorter than
another's. Arms score against the study's Stage B target (its Stage A target when it has none), and comparisons are
paired per study on the studies both sides cover: ehr_on - ehr_off (and each Stage B arm against stage_a) with a
paired bootstrap interval, an approximate-randomization p-value and its Holm adjustment over the table
(training/metrics/stats.py). A comparison whose metric is undefined on a side (an F1 with no positive anywhere) is
written as undefined. When the checkpoint has a sibling `stage_A_end/`, it is evaluated on the same arms beside the
model; with --baseline-checkpoint a separately trained model (e.g. image-only, `curriculum.stage_split=1.0`, same
steps) is too, with the same paired comparisons. A CheXpert majority-class baseline (each label's most frequent value
in the training file, or in the evaluation file when that is not there) is scored beside the model.

Outputs in --out: metrics.json (written once the arms are scored, again when the comparisons are done), report.md,
plots/*.png (logged to an MLflow run of the experiment: parameters are paths and settings only, never patient data)
and, only with --save-predictions, predictions.jsonl (which holds patient data: EHR-conditioned text).
"""

# The package, by job (this docstring is `launcher evaluate --help`): studies.py (which studies, which arm scores
# which), generation.py (the models and what they generate), scoring.py (metrics, intervals, the majority baseline,
# paired comparisons), report.py (metrics.json, report.md, predictions, the printed summary, MLflow's params and
# metrics), plots.py (matplotlib), options.py (the command's flags) and run.py (the command end to end; its MLflow
# run goes through training/tracking.py).

from training.evaluation.options import EvalOptions
from training.evaluation.report import summary_lines
from training.evaluation.run import run_evaluation

__all__ = ["EvalOptions", "run_evaluation", "summary_lines"]
