#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=1
#SBATCH --error=<FOLDER>/%j_0_log.err
#SBATCH --job-name=mlvar-digits-holdout-sub3-r1.0-mlp
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=<FOLDER>/%j_0_log.out
#SBATCH --partition=cpu
#SBATCH --signal=USR2@90
#SBATCH --time=10

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <FOLDER>/%j_%t_log.out --error <FOLDER>/%j_%t_log.err <PYTHON> -u -m submitit.core._submit <FOLDER>
