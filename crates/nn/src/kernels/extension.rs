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
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
use burn::tensor::{DType, TensorData};

use super::conv::{self, ConvGeometry};
use super::conv_transpose::{self, TransposedShape};
use super::group_norm::{self, GroupMoments, GroupShape};
use super::norm::{self, Act, BatchMoments, NormShape};
use super::{resample, softmax};

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

    /// BatchNorm in training mode followed by `x > 0 ? min(x, max) : slope·x` (ReLU for slope 0
    /// and max ∞, ReLU6 for max 6, no activation for slope 1 and max ∞): output, batch mean and
    /// biased batch variance (the last two per channel, untracked).
    fn fast_batch_norm_act(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        activation: (f64, f64),
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The same as burn's `conv_transpose2d` (NCHW input, `[in, out / groups, kh, kw]`
    /// weight) without a bias.
    fn fast_conv_transpose2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvTransposeOptions<2>,
    ) -> FloatTensor<Self>;

    /// The same as burn's `conv_transpose2d` with a bias.
    fn fast_conv_transpose2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvTransposeOptions<2>,
    ) -> FloatTensor<Self>;

    /// GroupNorm with `groups` groups and per-channel gamma and beta over `[batch, channels,
    /// ...]`, followed by SiLU when `silu`. f32 only, channels a multiple of `groups`, no empty
    /// axis: the layer functions ([`super::group_norm`], [`super::group_norm_silu`]) check that before calling.
    fn fast_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        silu: bool,
    ) -> FloatTensor<Self>;

    /// `softmax(scale · x)` over the last axis (f32, no empty axis, scale > 0).
    fn fast_softmax(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;

    /// Nearest-neighbour up-sampling of an NCHW f32 tensor by 2 along both image axes.
    fn fast_upsample_nearest2(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// 2x2 average pooling with stride 2 of an NCHW f32 tensor (an odd last row or column left
    /// out, as `avg_pool2d` without padding does).
    fn fast_avg_pool2(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The shapes of a convolution the kernels handle: f32, and one group or one filter per channel
/// without dilation. `None` sends it to burn-flex's own operations.
fn geometry(x: &FlexTensor, weight: &FlexTensor, options: &ConvOptions<2>) -> Option<ConvGeometry> {
    if x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        return None;
    }
    let (xs, ws) = (x.shape(), weight.shape());
    let depthwise = options.groups > 1
        && options.groups == xs[1]
        && options.groups == ws[0]
        && ws[1] == 1
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
fn burn_activation<B: Backend>(x: FloatTensor<B>, (slope, max): (f64, f64)) -> FloatTensor<B> {
    let x = if slope == 0.0 {
        B::relu(x)
    } else if slope == 1.0 {
        x
    } else {
        B::leaky_relu(x, slope.into())
    };
    if max.is_finite() {
        B::float_clamp_max(x, max.into())
    } else {
        x
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

/// The geometry of a transposed convolution the kernels handle (f32, one group); `None` sends
/// it to burn-flex's own operation.
fn transposed_geometry(
    x: &FlexTensor,
    weight: &FlexTensor,
    options: &ConvTransposeOptions<2>,
) -> Option<ConvGeometry> {
    let (xs, ws) = (x.shape(), weight.shape());
    let f32s = x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    if !f32s || options.groups != 1 || xs.num_dims() != 4 || ws.num_dims() != 4 {
        return None;
    }
    TransposedShape {
        input: [xs[0], xs[1], xs[2], xs[3]],
        weight: [ws[0], ws[1], ws[2], ws[3]],
        stride: options.stride,
        padding: options.padding,
        padding_out: options.padding_out,
        dilation: options.dilation,
    }
    .geometry()
}

/// The transposed convolution on flex, with or without a bias.
fn flex_conv_transpose2d(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    options: ConvTransposeOptions<2>,
) -> FlexTensor {
    let Some(g) = transposed_geometry(&x, &weight, &options) else {
        return Flex::conv_transpose2d(x, weight, bias, options);
    };
    let (x, weight, bias) = (values(&x), values(&weight), bias.as_ref().map(values));
    let out = conv_transpose::forward(&g, slice(&x), slice(&weight), bias.as_ref().map(slice));
    tensor(out, [g.batch, g.in_channels, g.in_h, g.in_w])
}

/// `[batch, channels, pixels, groups]` of a tensor [`TrainingKernels::fast_group_norm`] takes.
fn group_shape(x: &FlexTensor, groups: usize) -> GroupShape {
    let shape = x.shape();
    assert!(
        x.dtype() == DType::F32 && shape.num_dims() >= 3 && groups > 0 && shape[1].is_multiple_of(groups),
        "vigil's group norm takes f32 [batch, channels, ...] with channels a multiple of the groups"
    );
    GroupShape {
        batch: shape[0],
        channels: shape[1],
        pixels: shape.num_elements() / (shape[0] * shape[1]).max(1),
        groups,
    }
}

/// The fused group norm on flex, with the statistics its backward pass reuses.
fn flex_group_norm(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    (groups, epsilon, silu): (usize, f64, bool),
) -> (FlexTensor, GroupShape, GroupMoments) {
    let s = group_shape(x, groups);
    let (xv, gamma, beta) = (values(x), values(gamma), values(beta));
    let (out, moments) = group_norm::forward(&s, slice(&xv), (slice(&gamma), slice(&beta)), epsilon, silu);
    (FlexTensor::from_data(TensorData::new(out, x.shape())), s, moments)
}

/// The length of the last axis of a tensor [`TrainingKernels::fast_softmax`] takes.
fn softmax_row(x: &FlexTensor) -> usize {
    let shape = x.shape();
    let row = shape[shape.num_dims() - 1];
    assert!(x.dtype() == DType::F32 && row > 0, "vigil's softmax takes f32 rows of at least one value");
    row
}

fn flex_softmax(x: &FlexTensor, scale: f64) -> FlexTensor {
    let row = softmax_row(x);
    let out = softmax::forward(slice(&values(x)), row, scale as f32);
    FlexTensor::from_data(TensorData::new(out, x.shape()))
}

/// `[batch, channels, h, w]` of an NCHW f32 tensor the resampling kernels take.
fn image_dims(x: &FlexTensor) -> [usize; 4] {
    let shape = x.shape();
    assert!(x.dtype() == DType::F32 && shape.num_dims() == 4, "vigil's resampling takes f32 NCHW tensors");
    [shape[0], shape[1], shape[2], shape[3]]
}

fn flex_upsample_nearest2(x: &FlexTensor) -> FlexTensor {
    let [n, c, h, w] = image_dims(x);
    tensor(resample::upsample_nearest2(slice(&values(x)), [h, w]), [n, c, 2 * h, 2 * w])
}

fn flex_avg_pool2(x: &FlexTensor) -> FlexTensor {
    let [n, c, h, w] = image_dims(x);
    tensor(resample::avg_pool2(slice(&values(x)), [h, w]), [n, c, h / 2, w / 2])
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
        activation: (f64, f64),
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let Some(s) = norm_shape(&x) else {
            let result = Flex::batch_norm_train(x, gamma, beta, epsilon);
            return (burn_activation::<Flex>(result.output, activation), result.mean, result.variance);
        };
        let shape = x.shape();
        let (x, gamma, beta) = (values(&x), values(&gamma), values(&beta));
        let (out, mean, variance) =
            norm::forward(&s, slice(&x), slice(&gamma), slice(&beta), epsilon, act(activation));
        (FlexTensor::from_data(TensorData::new(out, shape)), vector(mean), vector(variance))
    }

    fn fast_conv_transpose2d(
        x: FlexTensor,
        weight: FlexTensor,
        options: ConvTransposeOptions<2>,
    ) -> FlexTensor {
        flex_conv_transpose2d(x, weight, None, options)
    }

    fn fast_conv_transpose2d_bias(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        options: ConvTransposeOptions<2>,
    ) -> FlexTensor {
        flex_conv_transpose2d(x, weight, Some(bias), options)
    }

    fn fast_group_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        groups: usize,
        epsilon: f64,
        silu: bool,
    ) -> FlexTensor {
        flex_group_norm(&x, &gamma, &beta, (groups, epsilon, silu)).0
    }

    fn fast_softmax(x: FlexTensor, scale: f64) -> FlexTensor {
        flex_softmax(&x, scale)
    }

    fn fast_upsample_nearest2(x: FlexTensor) -> FlexTensor {
        flex_upsample_nearest2(&x)
    }

    fn fast_avg_pool2(x: FlexTensor) -> FlexTensor {
        flex_avg_pool2(&x)
    }
}

/// Backward of a transposed convolution: parents input, weight and, for `PARENTS` = 3, bias.
#[derive(Debug)]
struct ConvTranspose2dBackward<const PARENTS: usize>;

impl<const PARENTS: usize> Backward<Flex, PARENTS> for ConvTranspose2dBackward<PARENTS> {
    type State = (NodeId, NodeId, ConvTransposeOptions<2>);

    fn backward(
        self,
        ops: Ops<Self::State, PARENTS>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = values(&grads.consume::<Flex>(&ops.node));
        let (x, weight, options) = ops.state;
        let x = values(&checkpointer.retrieve_node_output::<FlexTensor>(x));
        let weight = values(&checkpointer.retrieve_node_output::<FlexTensor>(weight));
        let g =
            transposed_geometry(&x, &weight, &options).expect("a transposed convolution the kernels handle");
        let parents = ops.parents;
        if let Some(node) = &parents[0] {
            let dx = conv_transpose::input_grad(&g, slice(&weight), slice(&grad));
            grads.register::<Flex>(node.id, tensor(dx, [g.batch, g.out_channels, g.out_h, g.out_w]));
        }
        if let Some(node) = &parents[1] {
            let dw = conv_transpose::weight_grad(&g, slice(&x), slice(&grad));
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dw, weight.shape())));
        }
        if let Some(Some(node)) = parents.get(2) {
            grads.register::<Flex>(node.id, vector(conv_transpose::bias_grad(&g, slice(&grad))));
        }
    }
}

/// The transposed convolution recorded for autodiff: vigil's backward where
/// [`transposed_geometry`] accepts it, burn's own operation otherwise.
fn autodiff_conv_transpose2d<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    weight: FloatTensor<Autodiff<Flex, C>>,
    bias: Option<FloatTensor<Autodiff<Flex, C>>>,
    options: ConvTransposeOptions<2>,
) -> FloatTensor<Autodiff<Flex, C>> {
    if transposed_geometry(x.primitive(), weight.primitive(), &options).is_none() {
        return Autodiff::<Flex, C>::conv_transpose2d(x, weight, bias, options);
    }
    let compute = |x: FloatTensor<Autodiff<Flex, C>>,
                   weight: FloatTensor<Autodiff<Flex, C>>,
                   bias: Option<FloatTensor<Autodiff<Flex, C>>>| {
        flex_conv_transpose2d(
            x.into_primitive(),
            weight.into_primitive(),
            bias.map(|b| b.into_primitive()),
            options.clone(),
        )
    };
    match bias {
        Some(bias) => {
            match ConvTranspose2dBackward::<3>
                .prepare::<C>([x.node(), weight.node(), bias.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let state = (prep.checkpoint(&x), prep.checkpoint(&weight), options.clone());
                    prep.finish(state, compute(x, weight, Some(bias)))
                }
                OpsKind::UnTracked(prep) => prep.finish(compute(x, weight, Some(bias))),
            }
        }
        None => match ConvTranspose2dBackward::<2>
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), options.clone());
                prep.finish(state, compute(x, weight, None))
            }
            OpsKind::UnTracked(prep) => prep.finish(compute(x, weight, None)),
        },
    }
}

/// Backward of the fused group norm + activation: parents input, gamma, beta.
#[derive(Debug)]
struct GroupNormAct;

impl Backward<Flex, 3> for GroupNormAct {
    /// Input, gamma, beta, the shape, the group statistics, SiLU or not.
    type State = (NodeId, NodeId, NodeId, GroupShape, GroupMoments, bool);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = values(&grads.consume::<Flex>(&ops.node));
        let (x, gamma, beta, s, moments, silu) = ops.state;
        let x = values(&checkpointer.retrieve_node_output::<FlexTensor>(x));
        let gamma = values(&checkpointer.retrieve_node_output::<FlexTensor>(gamma));
        let beta = values(&checkpointer.retrieve_node_output::<FlexTensor>(beta));
        let (dx, dgamma, dbeta) =
            group_norm::backward(&s, slice(&x), (slice(&gamma), slice(&beta)), &moments, silu, slice(&grad));
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

/// Backward of the scaled softmax: its output and scale are the state.
#[derive(Debug)]
struct Softmax;

impl Backward<Flex, 1> for Softmax {
    type State = (FlexTensor, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = values(&grads.consume::<Flex>(&ops.node));
        let (y, scale) = ops.state;
        if let Some(node) = ops.parents[0].clone() {
            let row = softmax_row(&y);
            let dx = softmax::backward(slice(&y), slice(&grad), row, scale as f32);
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, y.shape())));
        }
    }
}

/// Backward of the nearest up-sampling by 2: the input's dims are the state.
#[derive(Debug)]
struct UpsampleNearest2;

impl Backward<Flex, 1> for UpsampleNearest2 {
    type State = [usize; 4];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = values(&grads.consume::<Flex>(&ops.node));
        let [n, c, h, w] = ops.state;
        if let Some(node) = ops.parents[0].clone() {
            let dx = resample::upsample_nearest2_backward(slice(&grad), [h, w]);
            grads.register::<Flex>(node.id, tensor(dx, [n, c, h, w]));
        }
    }
}

/// Backward of the 2x2 average pooling: the input's dims are the state.
#[derive(Debug)]
struct AvgPool2;

impl Backward<Flex, 1> for AvgPool2 {
    type State = [usize; 4];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = values(&grads.consume::<Flex>(&ops.node));
        let [n, c, h, w] = ops.state;
        if let Some(node) = ops.parents[0].clone() {
            let dx = resample::avg_pool2_backward(slice(&grad), [h, w]);
            grads.register::<Flex>(node.id, tensor(dx, [n, c, h, w]));
        }
    }
}

/// The kernels' activation of a (slope, max) pair.
fn act((slope, max): (f64, f64)) -> Act {
    Act { slope: slope as f32, max: max as f32 }
}

/// Backward of the fused BatchNorm + activation: parents input, gamma, beta.
#[derive(Debug)]
struct BatchNormAct;

impl Backward<Flex, 3> for BatchNormAct {
    /// Input, gamma, beta, batch mean and variance, epsilon, (slope, max).
    type State = (NodeId, NodeId, NodeId, FlexTensor, FlexTensor, f64, (f64, f64));

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = values(&grads.consume::<Flex>(&ops.node));
        let (x, gamma, beta, mean, variance, epsilon, activation) = ops.state;
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
            act(activation),
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
        activation: (f64, f64),
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if norm_shape(x.primitive()).is_none() {
            let result = Self::batch_norm_train(x, gamma, beta, epsilon);
            return (burn_activation::<Self>(result.output, activation), result.mean, result.variance);
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
                    activation,
                );
                let state =
                    (inputs.0, inputs.1, inputs.2, mean.clone(), variance.clone(), epsilon, activation);
                (prep.finish(state, out), untracked(mean), untracked(variance))
            }
            OpsKind::UnTracked(prep) => {
                let (out, mean, variance) = <Flex as TrainingKernels>::fast_batch_norm_act(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                    activation,
                );
                (prep.finish(out), untracked(mean), untracked(variance))
            }
        }
    }

    fn fast_conv_transpose2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvTransposeOptions<2>,
    ) -> FloatTensor<Self> {
        autodiff_conv_transpose2d::<C>(x, weight, None, options)
    }

    fn fast_conv_transpose2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvTransposeOptions<2>,
    ) -> FloatTensor<Self> {
        autodiff_conv_transpose2d::<C>(x, weight, Some(bias), options)
    }

    fn fast_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        epsilon: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let settings = (groups, epsilon, silu);
        match GroupNormAct.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let inputs = (prep.checkpoint(&x), prep.checkpoint(&gamma), prep.checkpoint(&beta));
                let (out, s, moments) =
                    flex_group_norm(x.primitive(), gamma.primitive(), beta.primitive(), settings);
                prep.finish((inputs.0, inputs.1, inputs.2, s, moments, silu), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(flex_group_norm(x.primitive(), gamma.primitive(), beta.primitive(), settings).0)
            }
        }
    }

    fn fast_softmax(x: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        match Softmax.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = flex_softmax(x.primitive(), scale);
                prep.finish((out.clone(), scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(flex_softmax(x.primitive(), scale)),
        }
    }

    fn fast_upsample_nearest2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let dims = image_dims(x.primitive());
        match UpsampleNearest2.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(dims, flex_upsample_nearest2(x.primitive())),
            OpsKind::UnTracked(prep) => prep.finish(flex_upsample_nearest2(x.primitive())),
        }
    }

    fn fast_avg_pool2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let dims = image_dims(x.primitive());
        match AvgPool2.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(dims, flex_avg_pool2(x.primitive())),
            OpsKind::UnTracked(prep) => prep.finish(flex_avg_pool2(x.primitive())),
        }
    }
}
