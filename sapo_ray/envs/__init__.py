"""Multi-turn episodes: the tools a turn can call (`sapo_ray.envs.tools`)."""
