"""The answer vocabulary of the synthetic image question-answer set (ARR-COC's data).

Shared by its generator (launcher/synthetic.py) and the model that answers it (jobs/arrcoc.py),
so the cluster side needs no import of the generator.
"""

VQA_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 70, 230), "yellow": (235, 220, 40)}
VQA_SHAPES = ("square", "circle", "triangle")
VQA_PLACES = ("top left", "top right", "bottom left", "bottom right")
