"""Inference: checkpoints of every form -> Sa2VA on one device, on N devices (data-parallel) or split over
several (model-parallel) -> masks, overlays, metrics. `vseg.predict.run` (predict.py) ties it together.

- `predictor` `Predictor`: a model loaded once (any form, placement, dtype), predicting batches or images
- `sources`   which checkpoint form `ckpt=` names and how to rebuild its model
- `inputs`    which images `input=` names (file, folder, glob, list file, dataset config) and reading them
- `engine`    the batched forward: teacher-forced [SEG] (fast path) or greedy generation
- `placement` one device, or `device_map` over several GPUs with accelerate
- `parallel`  data-parallel prediction on Lightning's Trainer.predict with a writer callback
- `outputs`   masks, overlays, results.jsonl, summary.json; atomic files and resume
- `scoring`   Dice, IoU, precision, recall, clDice, HD95, ASSD within a field of view
- `refine`    refinement by clicks: SAM-2 points next to the [SEG] embedding, encodings kept per image
- `targets`   several targets per image (`targets=`): one question each, (images x targets) rows per pass
"""
