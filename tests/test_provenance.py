"""The model card's record of where an adapter came from: the launcher read from the
process's ancestors, the data's fingerprints."""

import hashlib

import pytest

from wlora_dist.training.provenance import _launcher_of, _short, data_fingerprints


@pytest.mark.parametrize(
    ("cmd", "name"),
    [
        (["/v/bin/python3", "/v/bin/accelerate", "launch", "--config_file", "a.yaml", "train.py"], "accelerate launch"),
        (["python3", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x", "train.py"], "the deepspeed launcher"),
        (["/v/bin/python3", "/v/bin/torchrun", "--nproc_per_node", "2", "train.py"], "torchrun"),
        (["python", "-m", "torch.distributed.run", "train.py"], "torchrun"),
        (["srun", "--ntasks", "2", "torchrun", "train.py"], "srun"),
        (["bash", "-c", "accelerate launch train.py"], None),  # a word in the arguments is not the program
        (["timeout", "60", "deepspeed", "train.py"], None),
        (["/v/bin/python3", "train.py", "--config", "c.yaml"], None),
    ],
)
def test_the_launcher_is_the_program_not_a_word_of_its_arguments(cmd, name):
    assert _launcher_of(cmd) == name


def test_a_launcher_is_shown_by_its_own_name():
    assert _short(["/v/bin/python3", "/v/bin/accelerate", "launch", "x"]) == ["accelerate", "launch", "x"]
    assert _short(["/usr/bin/python3.11", "train.py"]) == ["python3.11", "train.py"]


def test_data_fingerprints_name_the_bytes(tmp_path):
    import datasets

    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "a"}\n')
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(folder))
    rows = data_fingerprints([str(f), str(folder), "someone/dataset"])
    assert rows[0] == f"`{f.resolve()}` (14 bytes, sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:16]})"
    assert rows[1].startswith(f"`{folder.resolve()}` (saved dataset, fingerprint ") and "?" not in rows[1]
    assert rows[2] == "`someone/dataset` (hub dataset)"
