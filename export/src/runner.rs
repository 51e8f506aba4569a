//! Running the exported graphs with ONNX Runtime (through `ort`): a session per graph (read
//! from a file, or built in memory), on ONNX Runtime's CUDA execution provider when asked for
//! and available, else on the CPU; inputs and outputs as flat row-major `f32` buffers.

use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::TensorRef;

use crate::proto::ModelProto;
use crate::runtime::OrtRuntime;
use crate::{Error, Result};

/// What `controller.onnx` returns for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Controlled {
    /// `[batch, d]`.
    pub edited: Vec<f32>,
    /// `[batch]`.
    pub value_before: Vec<f32>,
    /// `[batch]`.
    pub value_after: Vec<f32>,
}

/// An ONNX Runtime session of one exported graph.
#[derive(Debug)]
pub struct GraphSession {
    path: PathBuf,
    session: Session,
}

impl GraphSession {
    /// Opens `path` on the CPU; `threads` caps ONNX Runtime's intra-op threads (which do not
    /// spin between runs).
    pub fn open(runtime: &OrtRuntime, path: &Path, threads: Option<usize>) -> Result<Self> {
        Ok(Self::open_on(runtime, path, threads, None)?.0)
    }

    /// Opens `path` with ONNX Runtime's CUDA execution provider on device `cuda` when the
    /// loaded onnxruntime has it (an onnxruntime-gpu build), else on the CPU. Returns the
    /// session and the execution provider used (`"cuda"` or `"cpu"`).
    pub fn open_on(
        runtime: &OrtRuntime,
        path: &Path,
        threads: Option<usize>,
        cuda: Option<usize>,
    ) -> Result<(Self, &'static str)> {
        let (mut builder, provider) = builder(runtime, path, threads, cuda)?;
        let session = builder.commit_from_file(path).map_err(ort_error(path))?;
        Ok((
            Self {
                path: path.to_owned(),
                session,
            },
            provider,
        ))
    }

    /// A session of `model` built in memory (no file written), placed as [`Self::open_on`]
    /// places one; `source` names where the graph came from in errors.
    pub fn from_model_on(
        runtime: &OrtRuntime,
        model: &ModelProto,
        source: &Path,
        threads: Option<usize>,
        cuda: Option<usize>,
    ) -> Result<(Self, &'static str)> {
        use prost::Message;
        let (mut builder, provider) = builder(runtime, source, threads, cuda)?;
        let session = builder
            .commit_from_memory(&model.encode_to_vec())
            .map_err(ort_error(source))?;
        Ok((
            Self {
                path: source.to_owned(),
                session,
            },
            provider,
        ))
    }

    /// Runs the graph on `hidden [batch, d]` (and `alpha`, for the controller) and returns
    /// the named float outputs, flat, in the order asked.
    fn run<const N: usize>(
        &mut self,
        hidden: &[f32],
        batch: usize,
        alpha: Option<f32>,
        outputs: [&'static str; N],
    ) -> Result<[Vec<f32>; N]> {
        if batch == 0 || !hidden.len().is_multiple_of(batch) {
            return Err(Error::BatchShape {
                path: self.path.clone(),
                values: hidden.len(),
                batch,
            });
        }
        let err = ort_error(&self.path);
        let hidden =
            TensorRef::from_array_view(([batch, hidden.len() / batch], hidden)).map_err(&err)?;
        let alpha = alpha.map(|a| [a]);
        let out = match &alpha {
            Some(a) => {
                let a = TensorRef::from_array_view((Vec::<i64>::new(), &a[..])).map_err(&err)?;
                self.session
                    .run(ort::inputs!["hidden" => hidden, "alpha" => a])
            }
            None => self.session.run(ort::inputs!["hidden" => hidden]),
        }
        .map_err(&err)?;
        let mut values: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
        for (value, name) in values.iter_mut().zip(outputs) {
            let tensor = out.get(name).ok_or_else(|| Error::NoOutput {
                path: self.path.clone(),
                name,
            })?;
            *value = tensor.try_extract_tensor::<f32>().map_err(&err)?.1.to_vec();
        }
        Ok(values)
    }

    /// `value.onnx` (or any graph with a `value` output): V `[batch]`.
    pub fn value(&mut self, hidden: &[f32], batch: usize) -> Result<Vec<f32>> {
        let [value] = self.run(hidden, batch, None, ["value"])?;
        Ok(value)
    }

    /// `value_grad.onnx`: V `[batch]` and dV/dh `[batch, d]`.
    pub fn value_grad(&mut self, hidden: &[f32], batch: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let [value, grad] = self.run(hidden, batch, None, ["value", "grad"])?;
        Ok((value, grad))
    }

    /// `controller.onnx`: the edited states and V before and after.
    pub fn control(&mut self, hidden: &[f32], batch: usize, alpha: f32) -> Result<Controlled> {
        let [edited, value_before, value_after] = self.run(
            hidden,
            batch,
            Some(alpha),
            ["edited_hidden", "value_before", "value_after"],
        )?;
        Ok(Controlled {
            edited,
            value_before,
            value_after,
        })
    }
}

/// A session builder on the CUDA execution provider (device `cuda`) when asked for and the
/// loaded onnxruntime has it, else on the CPU; and which of the two it is.
fn builder(
    runtime: &OrtRuntime,
    path: &Path,
    threads: Option<usize>,
    cuda: Option<usize>,
) -> Result<(ort::session::builder::SessionBuilder, &'static str)> {
    use ort::ep::ExecutionProvider;
    let err = ort_error(path);
    // No spinning between runs: the LM's libtorch threads share the cores with ours.
    let mut builder = Session::builder(runtime.environment())
        .map_err(&err)?
        .with_intra_op_spinning(false)
        .map_err(|e| err(e.into()))?;
    if let Some(n) = threads {
        builder = builder.with_intra_threads(n).map_err(|e| err(e.into()))?;
    }
    let mut provider = "cpu";
    if let Some(device) = cuda {
        if ort::ep::CUDA::is_available().unwrap_or(false) {
            let ep = ort::ep::CUDA::default().with_device_id(device as i32);
            if ep.register(&mut builder).is_ok() {
                provider = "cuda";
            }
        }
    }
    Ok((builder, provider))
}

/// An ONNX Runtime error as this crate's, naming the model file.
fn ort_error(path: &Path) -> impl Fn(ort::Error) -> Error + '_ {
    move |source| Error::Runtime {
        path: path.to_owned(),
        source,
    }
}
