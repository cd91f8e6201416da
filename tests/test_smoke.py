from helpers import TinyClassifier, make_loader, quiet

import trainkit as tk


def test_fit_runs_to_max_steps_and_reports_it():
    trainer = tk.Trainer(run_mode="step", max_steps=10, eval_interval=5, **quiet())
    result = trainer.fit(TinyClassifier(), make_loader(), make_loader())
    assert (result.global_step, result.stop_reason, result.epoch) == (10, "max_steps", 1)
    assert [r["step"] for r in trainer.history] == [5, 10]
