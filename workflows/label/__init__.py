"""``wf suggest`` and ``wf label``: rank unlabelled images, and move new labels in."""
