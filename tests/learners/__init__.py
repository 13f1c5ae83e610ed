"""Tests of the dictionary learners, the trainer, their files and the train stage."""
