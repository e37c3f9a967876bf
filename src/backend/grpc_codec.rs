//! The gRPC codec: prost encoding, and decoding that refuses an item whose
//! decoded size would exceed its bound (see [`crate::decode_bound`]) before
//! decoding it. A `FrameBatch` of empty frames is as much of a decode bomb
//! as any repeated field.

use std::{marker::PhantomData, sync::Arc};

use bytes::Buf;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstCodec;

use crate::{
    decode_bound::{BoundedMessage, DecodeAllowance, Source},
    error::CodecError,
};

/// [`ProstCodec`] with bounded decoding.
#[derive(Debug)]
pub struct BoundedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: BoundedMessage + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(PhantomData)
    }
}

/// Decodes an item once its decoded size is known to be within bounds.
#[derive(Debug)]
pub struct BoundedDecoder<U>(PhantomData<U>);

/// A status carrying the codec error it stands for, which the frame reader
/// recovers (see [`codec_error`]).
pub(crate) fn refusal(error: CodecError) -> Status {
    let mut status = Status::invalid_argument(error.to_string());
    status.set_source(Arc::new(error));
    status
}

/// The codec error a status made by [`refusal`] stands for.
pub(crate) fn codec_error(status: &Status) -> Option<CodecError> {
    let source = std::error::Error::source(status)?;
    match source.downcast_ref::<CodecError>()? {
        CodecError::DecodeBound(err) => Some(CodecError::DecodeBound(err.clone())),
        CodecError::FrameTooLarge { size, max } => Some(CodecError::FrameTooLarge {
            size: *size,
            max: *max,
        }),
        _ => None,
    }
}

impl<U: BoundedMessage + Send + 'static> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic hands over the whole item in one contiguous buffer.
        debug_assert_eq!(buf.chunk().len(), buf.remaining());
        DecodeAllowance::for_frame(buf.remaining())
            .charge::<U>(buf.chunk(), Source::Shared)
            .map_err(|err| refusal(CodecError::DecodeBound(err)))?;
        U::decode(buf)
            .map(Some)
            .map_err(|err| Status::internal(err.to_string()))
    }
}
