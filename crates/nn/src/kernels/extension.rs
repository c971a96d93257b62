//! vigil's training kernels as a burn backend extension: implemented for the flex backend and,
//! with their backward passes, for `Autodiff<Flex>`. Other backends never reach it (the layer
//! functions in [`super`] call burn's own operations there).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::TensorMetadata;
use burn::backend::{backend_extension, AutodiffBackend, Backend, Flex};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, TensorData};

use super::conv::{self, ConvGeometry};
use super::norm::{self, BatchMoments, NormShape};

/// Operations with a faster CPU implementation than the backend's own.
#[backend_extension(Flex, Autodiff)]
pub trait TrainingKernels: Backend {
    /// The same as burn's `conv2d` (NCHW input, `[out, in / groups, kh, kw]` weight) without a
    /// bias. (With and without a bias are two operations because the extension macro does not
    /// route optional tensors.)
    fn fast_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// The same as burn's `conv2d` with a bias.
    fn fast_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// BatchNorm in training mode followed by `x > 0 ? x : slope·x` (ReLU for slope 0):
    /// output, batch mean and biased batch variance (the last two per channel, untracked).
    fn fast_batch_norm_act(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        slope: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The shapes of a convolution the kernels handle: f32, and one group or one filter per channel
/// at stride 1 without dilation. `None` sends it to burn-flex's own operations.
fn geometry(x: &FlexTensor, weight: &FlexTensor, options: &ConvOptions<2>) -> Option<ConvGeometry> {
    if x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        return None;
    }
    let (xs, ws) = (x.shape(), weight.shape());
    let depthwise = options.groups > 1
        && options.groups == xs[1]
        && options.groups == ws[0]
        && ws[1] == 1
        && options.stride == [1, 1]
        && options.dilation == [1, 1];
    if options.groups != 1 && !depthwise {
        return None;
    }
    let out = |axis: usize| {
        let (begin, end) = options.padding[axis];
        let reach = options.dilation[axis] * (ws[2 + axis] - 1);
        (xs[2 + axis] + begin + end - reach - 1) / options.stride[axis] + 1
    };
    Some(ConvGeometry {
        batch: xs[0],
        in_channels: xs[1],
        in_h: xs[2],
        in_w: xs[3],
        out_channels: ws[0],
        kernel: [ws[2], ws[3]],
        stride: options.stride,
        dilation: options.dilation,
        pad_begin: [options.padding[0].0 as isize, options.padding[1].0 as isize],
        out_h: out(0),
        out_w: out(1),
        depthwise,
    })
}

/// The values of an f32 tensor in row-major order (a copy only when it is a strided view).
fn values(tensor: &FlexTensor) -> FlexTensor {
    tensor.to_contiguous()
}

fn slice(tensor: &FlexTensor) -> &[f32] {
    tensor.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn tensor(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn vector(values: Vec<f32>) -> FlexTensor {
    let len = values.len();
    FlexTensor::from_data(TensorData::new(values, [len]))
}

/// `[batch, channels, pixels]` of an f32 tensor of rank 2 or more; `None` sends it to burn's
/// own operations.
fn norm_shape(x: &FlexTensor) -> Option<NormShape> {
    let shape = x.shape();
    (x.dtype() == DType::F32 && shape.num_dims() >= 2).then(|| NormShape {
        batch: shape[0],
        channels: shape[1],
        pixels: shape.num_elements() / (shape[0] * shape[1]).max(1),
    })
}

/// The element-wise activation [`TrainingKernels::fast_batch_norm_act`] applies, by burn.
fn burn_activation<B: Backend>(x: FloatTensor<B>, slope: f64) -> FloatTensor<B> {
    if slope == 0.0 {
        B::relu(x)
    } else {
        B::leaky_relu(x, slope.into())
    }
}

/// The forward convolution on flex, with or without a bias.
fn flex_conv2d(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    options: ConvOptions<2>,
) -> FlexTensor {
    let Some(g) = geometry(&x, &weight, &options) else {
        return Flex::conv2d(x, weight, bias, options);
    };
    let (x, weight, bias) = (values(&x), values(&weight), bias.as_ref().map(values));
    let out = conv::forward(&g, slice(&x), slice(&weight), bias.as_ref().map(slice));
    tensor(out, [g.batch, g.out_channels, g.out_h, g.out_w])
}

impl TrainingKernels for Flex {
    fn fast_conv2d(x: FlexTensor, weight: FlexTensor, options: ConvOptions<2>) -> FlexTensor {
        flex_conv2d(x, weight, None, options)
    }

    fn fast_conv2d_bias(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        options: ConvOptions<2>,
    ) -> FlexTensor {
        flex_conv2d(x, weight, Some(bias), options)
    }

    fn fast_batch_norm_act(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
        slope: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let Some(s) = norm_shape(&x) else {
            let result = Flex::batch_norm_train(x, gamma, beta, epsilon);
            return (burn_activation::<Flex>(result.output, slope), result.mean, result.variance);
        };
        let shape = x.shape();
        let (x, gamma, beta) = (values(&x), values(&gamma), values(&beta));
        let (out, mean, variance) =
            norm::forward(&s, slice(&x), slice(&gamma), slice(&beta), epsilon, slope as f32);
        (FlexTensor::from_data(TensorData::new(out, shape)), vector(mean), vector(variance))
    }
}

/// Backward of the fused BatchNorm + activation: parents input, gamma, beta.
#[derive(Debug)]
struct BatchNormAct;

impl Backward<Flex, 3> for BatchNormAct {
    /// Input, gamma, beta, batch mean and variance, epsilon, slope.
    type State = (NodeId, NodeId, NodeId, FlexTensor, FlexTensor, f64, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = values(&grads.consume::<Flex>(&ops.node));
        let (x, gamma, beta, mean, variance, epsilon, slope) = ops.state;
        let x = values(&checkpointer.retrieve_node_output::<FlexTensor>(x));
        let gamma = values(&checkpointer.retrieve_node_output::<FlexTensor>(gamma));
        let beta = values(&checkpointer.retrieve_node_output::<FlexTensor>(beta));
        let s = norm_shape(&x).expect("an f32 tensor the kernels handle");
        let moments = BatchMoments { mean: slice(&mean), variance: slice(&variance) };
        let (dx, dgamma, dbeta) = norm::backward(
            &s,
            slice(&x),
            (slice(&gamma), slice(&beta)),
            moments,
            epsilon,
            slope as f32,
            slice(&grad),
        );
        let dx = FlexTensor::from_data(TensorData::new(dx, x.shape()));
        for (node, grad) in
            [node_x, node_gamma, node_beta].into_iter().zip([dx, vector(dgamma), vector(dbeta)])
        {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

/// The gradients of a convolution that are wanted: input, weight, bias. Only convolutions
/// [`geometry`] accepts are recorded with this backward.
fn conv2d_backward(
    x: FlexTensor,
    weight: FlexTensor,
    grad: FlexTensor,
    options: ConvOptions<2>,
    [want_x, want_weight, want_bias]: [bool; 3],
) -> [Option<FlexTensor>; 3] {
    let g = geometry(&x, &weight, &options).expect("a convolution the kernels handle");
    let grad = values(&grad);
    let dx = want_x.then(|| {
        let weight = values(&weight);
        tensor(conv::input_grad(&g, slice(&weight), slice(&grad)), [g.batch, g.in_channels, g.in_h, g.in_w])
    });
    let dw = want_weight.then(|| {
        let x = values(&x);
        let [kh, kw] = g.kernel;
        let shape = [g.out_channels, g.depth() / (kh * kw), kh, kw];
        tensor(conv::weight_grad(&g, slice(&x), slice(&grad)), shape)
    });
    let db = want_bias.then(|| vector(conv::bias_grad(&g, slice(&grad))));
    [dx, dw, db]
}

/// Backward of a convolution with a bias: parents input, weight, bias.
#[derive(Debug)]
struct Conv2dWithBias;

/// Backward of a convolution without a bias: parents input, weight.
#[derive(Debug)]
struct Conv2dNoBias;

impl Backward<Flex, 3> for Conv2dWithBias {
    type State = (NodeId, NodeId, ConvOptions<2>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, weight, options) = ops.state;
        let x = checkpointer.retrieve_node_output::<FlexTensor>(x);
        let weight = checkpointer.retrieve_node_output::<FlexTensor>(weight);
        let wanted = [node_x.is_some(), node_weight.is_some(), node_bias.is_some()];
        let computed = conv2d_backward(x, weight, grad, options, wanted);
        for (node, grad) in [node_x, node_weight, node_bias].into_iter().zip(computed) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

impl Backward<Flex, 2> for Conv2dNoBias {
    type State = (NodeId, NodeId, ConvOptions<2>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, weight, options) = ops.state;
        let x = checkpointer.retrieve_node_output::<FlexTensor>(x);
        let weight = checkpointer.retrieve_node_output::<FlexTensor>(weight);
        let wanted = [node_x.is_some(), node_weight.is_some(), false];
        let computed = conv2d_backward(x, weight, grad, options, wanted);
        for (node, grad) in [node_x, node_weight].into_iter().zip(computed) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

/// The convolution recorded for autodiff, with or without a bias: vigil's backward where
/// [`geometry`] accepts it, burn's own operation otherwise.
fn autodiff_conv2d<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    weight: FloatTensor<Autodiff<Flex, C>>,
    bias: Option<FloatTensor<Autodiff<Flex, C>>>,
    options: ConvOptions<2>,
) -> FloatTensor<Autodiff<Flex, C>> {
    if geometry(x.primitive(), weight.primitive(), &options).is_none() {
        return Autodiff::<Flex, C>::conv2d(x, weight, bias, options);
    }
    match bias {
        Some(bias) => match Conv2dWithBias
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), options.clone());
                let out = flex_conv2d(
                    x.into_primitive(),
                    weight.into_primitive(),
                    Some(bias.into_primitive()),
                    options,
                );
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(flex_conv2d(
                x.into_primitive(),
                weight.into_primitive(),
                Some(bias.into_primitive()),
                options,
            )),
        },
        None => match Conv2dNoBias.prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), options.clone());
                prep.finish(state, flex_conv2d(x.into_primitive(), weight.into_primitive(), None, options))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(flex_conv2d(x.into_primitive(), weight.into_primitive(), None, options))
            }
        },
    }
}

impl<C: CheckpointStrategy> TrainingKernels for Autodiff<Flex, C> {
    fn fast_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        autodiff_conv2d::<C>(x, weight, None, options)
    }

    fn fast_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        autodiff_conv2d::<C>(x, weight, Some(bias), options)
    }

    fn fast_batch_norm_act(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        slope: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if norm_shape(x.primitive()).is_none() {
            let result = Self::batch_norm_train(x, gamma, beta, epsilon);
            return (burn_activation::<Self>(result.output, slope), result.mean, result.variance);
        }
        let untracked = |statistic: FlexTensor| <Self as AutodiffBackend>::from_inner(statistic);
        match BatchNormAct.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let inputs = (prep.checkpoint(&x), prep.checkpoint(&gamma), prep.checkpoint(&beta));
                let (out, mean, variance) = <Flex as TrainingKernels>::fast_batch_norm_act(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                    slope,
                );
                let state = (inputs.0, inputs.1, inputs.2, mean.clone(), variance.clone(), epsilon, slope);
                (prep.finish(state, out), untracked(mean), untracked(variance))
            }
            OpsKind::UnTracked(prep) => {
                let (out, mean, variance) = <Flex as TrainingKernels>::fast_batch_norm_act(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                    slope,
                );
                (prep.finish(out), untracked(mean), untracked(variance))
            }
        }
    }
}
