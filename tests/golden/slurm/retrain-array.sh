#!/bin/bash

# Parameters
#SBATCH --array=0-5%6
#SBATCH --cpus-per-task=2
#SBATCH --error=<FOLDER>/%A_%a_0_log.err
#SBATCH --job-name=mlvar-digits-holdout-sub3-r1.0-mlp
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=<FOLDER>/%A_%a_0_log.out
#SBATCH --partition=cpu
#SBATCH --signal=USR2@90
#SBATCH --time=30

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <FOLDER>/%A_%a_%t_log.out --error <FOLDER>/%A_%a_%t_log.err <PYTHON> -u -m submitit.core._submit <FOLDER>
