"""A Triton Python-backend model that runs the exported RTMDet ONNX file with onnxruntime.

`model.export.write_triton_repository(..., backend="python")` copies this file to
`<repo>/<name>/1/model.py`; it runs inside Triton's Python stub, never inside this package, and needs
only numpy and onnxruntime there. It exists because Triton builds without the onnxruntime backend
(such as the one `nvidia-pytriton` bundles) can still serve the same ONNX file this way.
Requests that Triton's dynamic batcher hands over together run as one onnxruntime call.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        onnx_file = params.get("onnx_file", {}).get("string_value", "model.onnx")
        path = os.path.join(args["model_repository"], args["model_version"], onnx_file)
        options = ort.SessionOptions()
        threads = int(os.environ.get("RTMDET_ORT_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        counts = [a.shape[0] for a in arrays]
        outputs = self.session.run(None, {self.input_name: np.concatenate(arrays, axis=0)})
        responses, start = [], 0
        for n in counts:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + n]))
                       for name, out in zip(self.output_names, outputs, strict=True)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
