"""Trainers of the proxies (the parser of hp, PaintNet, pix2pix, DTGAN), apart from the proxies themselves.

Each module follows `retrieval.training.trainers`: a frozen config dataclass and a registered train
function; `generation.proxies` adds them to the trainer lookup (`add_trainer_modules`).
"""
