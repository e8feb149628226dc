"""What one model step is given: the batch type the executor builds and graph runners and models read."""
