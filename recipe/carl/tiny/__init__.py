"""The CPU demo, `python -m recipe.carl.tiny.demo`, module by module from the top down (each imports only those below):

* ``demo``: one run (data, retriever, SFT start, verl's trainer, greedy check, summary); ``cli``: its flags;
* ``launch``: verl's trainer as a child process (environment, quiet log, progress, stop);
* ``warm_start``: the SFT start, the shipped one when its key fits; ``report``: what a run measured;
* ``plots``: the learning curves and a rollout tree; ``trajectory``: demonstrations in the agent loop's layout;
* ``sft``: the SFT loop; ``policy``: the tiny policy; ``config``: ``DemoConfig``; ``noise``: standard errors;
  ``local_agent``: the agent loop's environment on an in-process policy; ``sampler``: the trainer's quick-poll buffer.

Nothing is imported here, so importing one module does not load the others' dependencies.
"""
