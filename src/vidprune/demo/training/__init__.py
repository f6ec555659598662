"""Training of the shipped demo model, one module per concern: common (sizes, models, clips),
run (resume, schedule, checkpoints), vae, dit, export. The command line is vidprune.demo.train."""
