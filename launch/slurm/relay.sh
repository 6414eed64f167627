#!/bin/bash
# Per-node relay between srun and torchrun (used by train_multinode.sbatch).
#
# srun forwards SIGUSR1 to its tasks unchanged but answers SIGTERM by killing them, so the batch
# shell signals srun with USR1 (Slurm then sends it to every process of the step). A plain
# torchrun handles only TERM/INT/HUP/QUIT (USR1 would kill it before its workers checkpoint);
# torchrun_forward.py handles both. This relay runs the given command and turns the first
# USR1 (or TERM) it receives into one SIGTERM for it; torchrun_forward.py then passes SIGTERM to
# its workers, which finish the current step, checkpoint and exit. Exits with the command's status.
set -uo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
slurm_run_forwarding "${RELAY_SIGNAL:-TERM}" "$@"
exit "$SLURM_CHILD_RC"
