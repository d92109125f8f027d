"""``python -m mmkit.data.shapes``: samples per second of every task on this core."""
from mmkit.data.shapes.scene import TASKS
from mmkit.data.shapes.tasks import benchmark

if __name__ == "__main__":
    for t in TASKS:
        print(t, benchmark(n=500, task=t))
