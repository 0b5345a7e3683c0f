"""lmstack's own eval suites, each one module that registers one `Suite` (evaluation/suites.py)
when imported; importing this module registers them all, in the order `eval.suites` lists them.

Every suite that asks the model questions asks the session's rows: the user's `eval.data`
(their prompts, references and contexts) or, without it, the built-in task's held-out
problems. Each saves its per-row samples (prompt, completion, reference, score) and warns
when a figure cannot be computed (no rows, verdicts that cannot be parsed).
"""

import lmstack.evaluation.arena_suite
import lmstack.evaluation.faithfulness_suite
import lmstack.evaluation.format_suite
import lmstack.evaluation.humaneval
import lmstack.evaluation.ifeval
import lmstack.evaluation.judge_suite
import lmstack.evaluation.lm_eval_suite
import lmstack.evaluation.math_suite
import lmstack.evaluation.mmlu
import lmstack.evaluation.verifier_suite  # noqa: F401  (eval=verifier)
