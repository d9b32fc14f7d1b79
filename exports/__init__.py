"""The exported-artifact format shared by training (which writes it) and the service (which reads it).

Import only the standard library here: the service and edge devices load this without torch or onnx.
"""
