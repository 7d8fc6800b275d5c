"""``python -m trl_refine posttrain ...`` (and ``accelerate launch -m trl_refine posttrain ...``)."""

from trl_refine.cli import main

main()
