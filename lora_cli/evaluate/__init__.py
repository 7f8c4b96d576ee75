"""`lora eval`: did the fine-tune help? Loss, answer checks, lm-evaluation-harness tasks, base beside target.

run.py reads every input before any weights load and measures each side (target, base, starting adapter);
loss.py, answers.py and harness.py measure one side each; report.py prints the table and writes eval.json.
"""
