#!/bin/bash

# Parameters
#SBATCH --account=lab
#SBATCH --array=0-2%2
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=4
#SBATCH --error=<FOLDER>/%A_%a_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=1
#SBATCH --job-name=mlvar-digits-holdout-sub3-r1.0-mlp
#SBATCH --mem=16GB
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=<FOLDER>/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --signal=USR2@90
#SBATCH --time=120

# setup
module load cuda/12.1
source /shared/venvs/mlvar/bin/activate
export CUBLAS_WORKSPACE_CONFIG=:4096:8

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <FOLDER>/%A_%a_%t_log.out --error <FOLDER>/%A_%a_%t_log.err python3 -u -m submitit.core._submit <FOLDER>
